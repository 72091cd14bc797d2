//! An open-loop load generator for `bench/run.py`: requests are sent on a fixed schedule,
//! whatever the latency of earlier ones, and each latency is measured from the moment the
//! request was due (so a stall is not hidden by the requests it delays: no coordinated
//! omission). Prints one JSON line: sent, errors, p50/p90/p99/max in microseconds.
//!
//! Usage: open_loop URL METHOD BODY_FILE|- RATE SECONDS CONNECTIONS

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;
use tokio::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, url, method, body_file, rate, seconds, connections] = &args[..] else {
        return Err("usage: open_loop URL METHOD BODY_FILE|- RATE SECONDS CONNECTIONS".into());
    };
    let uri: Uri = url.parse()?;
    let body = match body_file.as_str() {
        "-" => Bytes::new(),
        path => Bytes::from(std::fs::read(path)?),
    };
    let rate: f64 = rate.parse()?;
    let seconds: f64 = seconds.parse()?;
    let connections: usize = connections.parse()?;
    let method: http::Method = method.parse()?;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let authority = uri.authority().ok_or("no authority")?.clone();
        let mut queues = Vec::new();
        let mut workers = Vec::new();
        for _ in 0..connections {
            let (tx, mut rx) = mpsc::unbounded_channel::<Instant>();
            queues.push(tx);
            let stream = tokio::net::TcpStream::connect(authority.as_str()).await?;
            stream.set_nodelay(true)?;
            let (mut sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            let (uri, method, body, host) = (
                uri.clone(),
                method.clone(),
                body.clone(),
                authority.to_string(),
            );
            workers.push(tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut errors = 0u64;
                while let Some(due) = rx.recv().await {
                    tokio::time::sleep_until(due).await;
                    let request = Request::builder()
                        .method(method.clone())
                        .uri(uri.path_and_query().map_or("/", |p| p.as_str()))
                        .header("host", &host)
                        .header("content-type", "application/json")
                        .body(Full::new(body.clone()))
                        .map_err(|e| e.to_string());
                    let ok = match request {
                        Ok(request) => match sender.send_request(request).await {
                            Ok(response) => response.into_body().collect().await.is_ok(),
                            Err(_) => false,
                        },
                        Err(_) => false,
                    };
                    if ok {
                        latencies
                            .push(u64::try_from(due.elapsed().as_micros()).unwrap_or(u64::MAX));
                    } else {
                        errors += 1;
                    }
                }
                (latencies, errors)
            }));
        }
        let total = (rate * seconds) as u64;
        let start = Instant::now() + Duration::from_millis(100);
        for i in 0..total {
            let due = start + Duration::from_secs_f64(i as f64 / rate);
            let _ = queues[(i as usize) % connections].send(due);
        }
        drop(queues);
        let mut all = Vec::new();
        let mut errors = 0;
        for w in workers {
            let (latencies, e) = w.await?;
            all.extend(latencies);
            errors += e;
        }
        all.sort_unstable();
        let pct = |p: f64| {
            all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0)
        };
        println!(
            "{{\"sent\":{},\"errors\":{},\"p50_us\":{},\"p90_us\":{},\"p99_us\":{},\"max_us\":{}}}",
            all.len() as u64 + errors,
            errors,
            pct(0.50),
            pct(0.90),
            pct(0.99),
            all.last().copied().unwrap_or(0)
        );
        Ok::<(), Box<dyn std::error::Error>>(())
    })
}
