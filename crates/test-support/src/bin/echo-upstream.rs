//! A standalone echo upstream for suites outside cargo test (compat/,
//! bench/): `echo-upstream NAME...` prints one line
//! `tls=ADDR plain=ADDR ca=FILE` and serves until killed. Every response
//! body is a JSON description of the request received (headers included),
//! so a client can check what keygate injected.

#[tokio::main]
async fn main() {
    let names: Vec<String> = std::env::args().skip(1).collect();
    let names: Vec<&str> = if names.is_empty() {
        vec!["localhost"]
    } else {
        names.iter().map(String::as_str).collect()
    };
    let up = test_support::Upstream::start(&names).await;
    println!(
        "tls={} plain={} ca={}",
        up.tls_addr,
        up.plain_addr,
        up.ca_file.display()
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();
    // Serve until killed; keep `up` (and its CA file) alive.
    let _ = tokio::signal::ctrl_c().await;
    drop(up);
}
