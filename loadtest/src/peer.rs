//! The shell the comparison peers (`echo-backend`, `fixed-401`) share:
//! parse a loopback address, bind it on a one-thread runtime, print
//! `listening <addr>`, and hand every accepted socket to a handler.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

/// Serves forever; exits 2 on a bad or non-loopback address, 1 if the
/// runtime or the bind fails. `name` prefixes every error line.
pub fn serve<F, Fut>(name: &str, default_addr: &str, handler: F) -> !
where
    F: Fn(TcpStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let fail = |code: i32, msg: String| -> ! {
        eprintln!("{name}: error: {msg}");
        std::process::exit(code)
    };
    let arg = std::env::args().nth(1).unwrap_or_else(|| default_addr.to_string());
    let addr: SocketAddr = arg.parse().unwrap_or_else(|e| fail(2, format!("bad address {arg:?}: {e}")));
    if !addr.ip().is_loopback() {
        fail(2, format!("{addr} is not a loopback address"));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(1, format!("cannot start the runtime: {e}")));
    rt.block_on(async move {
        let listener =
            TcpListener::bind(addr).await.unwrap_or_else(|e| fail(1, format!("cannot bind {addr}: {e}")));
        eprintln!("listening {}", listener.local_addr().unwrap_or(addr));
        loop {
            match listener.accept().await {
                Ok((tcp, _)) => {
                    tokio::spawn(handler(tcp));
                }
                // EMFILE and the like: back off instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
}
