//! The zone's answers, built from instances without a server or etcd.
