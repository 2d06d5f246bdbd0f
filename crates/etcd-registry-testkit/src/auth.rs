//! etcd's auth and RBAC for tests: a root user, and users confined to one
//! namespace of the registry's key layout.

use etcd_client::{Client, Permission};

use crate::{EtcdServer, Result};

/// The root user that [`EtcdServer::enable_auth`] creates.
pub const ROOT_USER: &str = "root";

impl EtcdServer {
    /// A client that authenticates as `user` (with TLS as in
    /// [`client`](Self::client)).
    ///
    /// # Errors
    ///
    /// [`Error::Etcd`](crate::Error::Etcd) if authentication fails.
    pub async fn client_as(&self, user: &str, password: &str) -> Result<Client> {
        let options = self.connect_options().with_user(user, password);
        Ok(Client::connect(self.endpoints(), Some(options)).await?)
    }

    /// Turns auth on: creates the user `root` with `root_password` and the
    /// `root` role, then enables authentication. From then on every request
    /// needs a user (see [`client_as`](Self::client_as)); with mutual TLS a
    /// client certificate's common name counts as its user.
    ///
    /// # Errors
    ///
    /// [`Error::Etcd`](crate::Error::Etcd) if etcd refuses a step (auth already
    /// on, say).
    pub async fn enable_auth(&self, root_password: &str) -> Result<()> {
        let mut client = self.client().await?;
        client.user_add(ROOT_USER, root_password, None).await?;
        client.user_grant_role(ROOT_USER, "root").await?;
        client.auth_enable().await?;
        tracing::debug!(name = %self.name(), "etcd auth enabled");
        Ok(())
    }

    /// Creates `user` with `password` and a role of the same name that may
    /// read and write only the keys under `{prefix}/{namespace}/`: one
    /// namespace of the registry's layout (its services and its elections).
    /// Works before and after [`enable_auth`](Self::enable_auth) (after it,
    /// as root with `root_password`).
    ///
    /// # Errors
    ///
    /// [`Error::Etcd`](crate::Error::Etcd) if etcd refuses a step.
    pub async fn add_namespace_user(
        &self,
        root_password: &str,
        user: &str,
        password: &str,
        prefix: &str,
        namespace: &str,
    ) -> Result<()> {
        let mut client = match self.client_as(ROOT_USER, root_password).await {
            Ok(client) => client,
            // Auth is still off: etcd refuses to authenticate anyone.
            Err(_) => self.client().await?,
        };
        let role = format!("{user}-role");
        client.role_add(role.as_str()).await?;
        let key = format!("{prefix}/{namespace}/");
        client
            .role_grant_permission(role.as_str(), Permission::read_write(key).with_prefix())
            .await?;
        client.user_add(user, password, None).await?;
        client.user_grant_role(user, role.as_str()).await?;
        tracing::debug!(name = %self.name(), user, prefix, namespace, "etcd namespace user added");
        Ok(())
    }
}
