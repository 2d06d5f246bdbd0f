//! One module per command, each owning its arguments. A command uses
//! `common` (and `supervise`), never another command.

pub mod campaign;
pub mod completions;
pub mod delete_service;
pub mod deregister;
pub mod dev;
pub mod dns;
pub mod leader;
pub mod list;
pub mod lock;
pub mod man;
pub mod observe;
pub mod register;
pub mod status;
pub mod ui;
pub mod watch;
