//! The network between the framework and a live NATS server cut mid-stream (every connection
//! through a TCP proxy dropped at once, messages in flight lost, the server itself up and
//! remembering what it delivered): the relay and the consumer come back by themselves, and every
//! event is applied once, in order per aggregate. Unlike a server restart, the server still
//! counts the messages it sent into the cut connections as delivered, and sends them again only
//! after `ack_wait`: a consumer that simply pulled on would apply newer messages first.

mod support;

use std::sync::{Arc, Mutex};

use cqrs_transport::conformance;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A TCP proxy to `target` whose connections can all be cut at once.
struct Proxy {
    port: u16,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    _accepting: JoinHandle<()>,
}

impl Proxy {
    async fn start(target: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let port = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("{e}"))
            .port();
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let held = connections.clone();
        let accepting = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let target = target.clone();
                let piping = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                held.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(piping);
            }
        });
        Self {
            port,
            connections,
            _accepting: accepting,
        }
    }

    /// Drops every connection through the proxy (both ends see it closed; bytes in flight lost).
    fn cut(&self) -> usize {
        let mut connections = self
            .connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let cut = connections.len();
        for connection in connections.drain(..) {
            connection.abort();
        }
        cut
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_network_cut_three_times_mid_stream_loses_and_reorders_nothing() {
    let server = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
    let target = server
        .trim_start_matches("nats://")
        .rsplit('@')
        .next()
        .unwrap_or("127.0.0.1:4222")
        .to_owned();
    let proxy = Arc::new(Proxy::start(target).await);
    support::set_url(format!("nats://127.0.0.1:{}", proxy.port));
    let cuts = {
        let proxy = proxy.clone();
        move |_n: u32| -> conformance::BoxFuture<'static, ()> {
            let proxy = proxy.clone();
            Box::pin(async move {
                let cut = proxy.cut();
                assert!(cut > 0, "nothing was connected through the proxy");
            })
        }
    };
    conformance::broker_restarted_mid_stream(
        &support::Nats,
        &support::namespace("netcut"),
        3,
        cuts,
    )
    .await;
}
