//! What the integration tests of the page server share.

use std::net::SocketAddr;
use std::thread::{self, JoinHandle};

use ckpt_page_server::{PageServer, ServerError, ServerOptions, SessionStats};

/// A page server on a free loopback port, serving one session on a thread of its own.
pub fn start_server(
    opts: ServerOptions,
) -> (SocketAddr, JoinHandle<Result<SessionStats, ServerError>>) {
    let server = PageServer::bind("127.0.0.1:0".parse().unwrap(), opts).unwrap();
    let addr = server.local_addr().unwrap();
    (addr, thread::spawn(move || server.serve_one()))
}
