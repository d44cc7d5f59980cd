//! A standalone streaming upstream (SSE, large bodies, upgrade echo) for
//! bench/: `stream-upstream NAME...` prints `tls=ADDR plain=- ca=FILE` and
//! serves until killed. Routes: see `test_support::StreamUpstream`.

#[tokio::main]
async fn main() {
    let names: Vec<String> = std::env::args().skip(1).collect();
    let names: Vec<&str> = if names.is_empty() {
        vec!["localhost"]
    } else {
        names.iter().map(String::as_str).collect()
    };
    let up = test_support::StreamUpstream::start(&names, test_support::Alpn::Both).await;
    println!("tls={} plain=- ca={}", up.tls_addr, up.ca_file.display());
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = tokio::signal::ctrl_c().await;
    drop(up);
}
