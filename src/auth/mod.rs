//! Client authentication and the read policy (DESIGN.md, "Who may read what"): who a request
//! comes from, and whether it may read what it asks for. Both come before the cache: a cache
//! hit is still a read.

/// The verified certificate a client presented on a TLS connection (`[server.tls] client_ca`),
/// attached to every request of that connection. Its common name is a user for the policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientCert {
    pub common_name: String,
}
