//! snapguard: a reverse proxy that polices snapshot naming in front of an OpenStack Cinder v3 /
//! Huawei Cloud EVS compatible API, and streams everything else upstream unchanged.
//!
//! A request's way through: [`server`] accepts it, [`proxy`] asks [`route`] whether it is
//! policed, has [`policy`] decide on its body, and forwards it with the [`upstream`] client;
//! every failure leaves through [`error`].

pub mod access;
pub mod admin;
pub mod body;
pub mod check;
pub mod cli;
pub mod config;
pub mod conn;
pub mod decide;
pub mod error;
pub mod gather;
pub mod headers;
pub mod lifetime;
pub mod memory;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod route;
pub mod server;
pub mod sign;
pub mod signing;
pub mod tls;
pub mod upstream;
pub mod watch;

pub use config::Config;
pub use server::Server;
