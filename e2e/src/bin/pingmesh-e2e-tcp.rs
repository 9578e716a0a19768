//! A stand-in service for the end-to-end tests: holds TCP connections open
//! so that the agents' eBPF tracers see them (`e2e/tests/services.rs`).
//!
//! - `listen <ip:port>`: accepts connections and keeps each one open until
//!   its peer closes it.
//! - `connect <ip:port> <n>`: opens `n` connections (retrying while nothing
//!   listens yet), prints `connected` and keeps them open until killed.
//!
//! The tracer names a process outside pods by its command (`comm`), which
//! comes from the executable's file name: the tests copy this binary to a
//! file named after the service (`train`, `store`) and run that copy.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["listen", addr] => parse(addr).and_then(listen),
        ["connect", addr, n] => parse(addr).and_then(|a| {
            let n = n.parse().map_err(|e| format!("bad count {n:?}: {e}"))?;
            connect(a, n)
        }),
        _ => Err("usage: pingmesh-e2e-tcp listen <ip:port> | connect <ip:port> <n>".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "pingmesh-e2e-tcp: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse(addr: &str) -> Result<SocketAddr, String> {
    addr.parse()
        .map_err(|e| format!("bad address {addr:?}: {e}"))
}

fn listen(addr: SocketAddr) -> Result<(), String> {
    let listener = TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
    println!("listening");
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        std::thread::spawn(move || {
            // Held until the peer closes it (read returns 0) or fails.
            let mut buf = [0_u8; 64];
            while stream.read(&mut buf).is_ok_and(|n| n > 0) {}
        });
    }
    Ok(())
}

fn connect(addr: SocketAddr, n: usize) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut held = Vec::with_capacity(n);
    while held.len() < n {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(s) => held.push(s),
            Err(e) if Instant::now() >= deadline => return Err(format!("connect {addr}: {e}")),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    println!("connected");
    let _ = std::io::stdout().flush();
    // Nothing unparks this thread: the connections stay open until killed.
    loop {
        std::thread::park();
    }
}
