//! The rendezvous store against real sockets: semantics under concurrency, and robustness against
//! bad tokens, truncated frames, huge length prefixes, random bytes and silent peers.
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use launcher::store::protocol::{write_frame, Request, Response, VERSION};
use launcher::store::{CompareSet, ServerOptions, StoreClient, StoreError, StoreServer};

const TOKEN: &str = "test-token";

fn server() -> StoreServer {
    StoreServer::bind_with(
        "127.0.0.1:0",
        TOKEN,
        ServerOptions {
            handshake_timeout: Duration::from_millis(500),
            frame_timeout: Duration::from_millis(500),
            ..ServerOptions::default()
        },
    )
    .unwrap()
}

fn client(server: &StoreServer) -> StoreClient {
    StoreClient::connect(
        "127.0.0.1",
        server.local_addr().port(),
        TOKEN,
        Duration::from_secs(5),
    )
    .unwrap()
}

fn raw(server: &StoreServer) -> TcpStream {
    let s = TcpStream::connect(server.local_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// Reads what the server says before closing: its error frame (if any) and then EOF.
fn read_until_closed(mut s: TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    all
}

fn hello(s: &mut TcpStream, token: &str) {
    let req = Request::Hello {
        version: VERSION,
        token: token.as_bytes().to_vec(),
    };
    write_frame(s, &req.encode()).unwrap();
    let mut reply = [0u8; 5];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(Response::decode(&reply[4..]).unwrap(), Response::Ok);
}

fn wait_for_rejections(server: &StoreServer, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.stats().rejected < n {
        assert!(
            Instant::now() < deadline,
            "expected {n} rejections, stats {:?}",
            server.stats()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn concurrent_adds_are_exact() {
    let server = server();
    let (threads, adds) = (16, 200);
    let start = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let mut c = client(&server);
            let start = start.clone();
            std::thread::spawn(move || {
                start.wait();
                (0..adds)
                    .map(|_| c.add("counter", 1).unwrap())
                    .collect::<Vec<i64>>()
            })
        })
        .collect();
    let mut seen: Vec<i64> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    seen.sort_unstable();
    let expected: Vec<i64> = (1..=(threads * adds) as i64).collect();
    assert_eq!(seen, expected, "every add returned a distinct value");
    assert_eq!(
        client(&server).get("counter").unwrap(),
        (threads * adds).to_string().into_bytes()
    );
}

#[test]
fn blocking_get_wakes_on_set() {
    let server = server();
    let mut waiter = client(&server);
    let mut setter = client(&server);
    let start = Instant::now();
    let handle = std::thread::spawn(move || {
        (
            waiter.get_timeout("key", Duration::from_secs(10)),
            start.elapsed(),
        )
    });
    std::thread::sleep(Duration::from_millis(200));
    setter.set("key", b"value").unwrap();
    let (got, elapsed) = handle.join().unwrap();
    assert_eq!(got.unwrap(), b"value");
    assert!(
        elapsed >= Duration::from_millis(200) && elapsed < Duration::from_secs(2),
        "{elapsed:?}"
    );
}

#[test]
fn blocking_calls_time_out_with_typed_errors() {
    let server = server();
    let mut c = client(&server);
    let start = Instant::now();
    let err = c
        .get_timeout("never", Duration::from_millis(300))
        .unwrap_err();
    assert!(matches!(err, StoreError::Timeout { .. }), "{err}");
    assert!(err.to_string().contains("key 'never'"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(2));
    let err = c.wait(&["a", "b"], Duration::from_millis(100)).unwrap_err();
    assert!(matches!(err, StoreError::Timeout { .. }), "{err}");
    // The connection is still usable after a timeout.
    c.set("a", b"1").unwrap();
    assert_eq!(c.try_get("a").unwrap(), Some(b"1".to_vec()));
}

#[test]
fn set_get_compare_set_wait_delete() {
    let server = server();
    let mut c = client(&server);
    assert_eq!(c.try_get("k").unwrap(), None);
    assert_eq!(
        c.compare_set("k", None, b"first").unwrap(),
        CompareSet::Swapped
    );
    assert_eq!(
        c.compare_set("k", None, b"second").unwrap(),
        CompareSet::Mismatch(Some(b"first".to_vec()))
    );
    assert_eq!(
        c.compare_set("k", Some(b"first"), b"third").unwrap(),
        CompareSet::Swapped
    );
    assert_eq!(c.get("k").unwrap(), b"third");
    assert_eq!(c.add("n", 5).unwrap(), 5);
    assert_eq!(c.add("n", -7).unwrap(), -2);
    let err = c.add("k", 1).unwrap_err();
    assert!(err.to_string().contains("not an integer"), "{err}");
    c.wait(&["k", "n"], Duration::from_secs(1)).unwrap();
    assert!(c.delete("k").unwrap());
    assert!(!c.delete("k").unwrap());
    assert_eq!(c.try_get("k").unwrap(), None);
    c.ping().unwrap();
    // Prefixes keep namespaces apart.
    let mut scoped = client(&server).with_prefix("ns/");
    scoped.set("n", b"x").unwrap();
    assert_eq!(c.try_get("ns/n").unwrap(), Some(b"x".to_vec()));
    assert_eq!(c.get("n").unwrap(), b"-2");
}

#[test]
fn barriers_are_reusable_and_report_stragglers() {
    let server = server();
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let mut c = client(&server);
            std::thread::spawn(move || {
                for round in 0..3 {
                    c.set(&format!("r{round}/{i}"), b"x").unwrap();
                    c.barrier("step", 4, Duration::from_secs(10)).unwrap();
                    // After the barrier every participant's key of this round exists.
                    for j in 0..4 {
                        assert!(c.try_get(&format!("r{round}/{j}")).unwrap().is_some());
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let mut lonely = client(&server);
    let err = lonely
        .barrier("lonely", 2, Duration::from_millis(200))
        .unwrap_err();
    assert!(
        err.to_string().contains("1 of 2 participants arrived"),
        "{err}"
    );
}

#[test]
fn wrong_or_missing_token_is_refused_and_the_server_keeps_serving() {
    let server = server();
    let port = server.local_addr().port();
    let err = StoreClient::connect("127.0.0.1", port, "not-the-token", Duration::from_secs(2))
        .unwrap_err();
    assert!(matches!(err, StoreError::Refused { .. }), "{err}");
    assert!(err.to_string().contains("wrong token"), "{err}");
    // A request without a hello first.
    let mut s = raw(&server);
    write_frame(&mut s, &Request::Ping.encode()).unwrap();
    let reply = read_until_closed(s);
    assert!(String::from_utf8_lossy(&reply).contains("first message must be a hello"));
    wait_for_rejections(&server, 2);
    client(&server).set("still", b"alive").unwrap();
}

#[test]
fn truncated_frames_are_rejected() {
    let server = server();
    // In the handshake: a prefix promising 100 bytes, then 10, then EOF.
    let mut s = raw(&server);
    s.write_all(&100u32.to_le_bytes()).unwrap();
    s.write_all(&[1; 10]).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    read_until_closed(s);
    // After a good hello: half a frame, then silence (the frame timeout closes it).
    let mut s = raw(&server);
    hello(&mut s, TOKEN);
    s.write_all(&50u32.to_le_bytes()).unwrap();
    s.write_all(&[2; 3]).unwrap();
    let mut other = client(&server);
    other.set("during", b"the stall").unwrap();
    let reply = read_until_closed(s);
    assert!(
        String::from_utf8_lossy(&reply).contains("timed out"),
        "{reply:?}"
    );
    wait_for_rejections(&server, 2);
    assert_eq!(other.get("during").unwrap(), b"the stall");
}

#[test]
fn a_two_gib_length_prefix_is_refused_without_allocating() {
    let server = server();
    for after_hello in [false, true] {
        let mut s = raw(&server);
        if after_hello {
            hello(&mut s, TOKEN);
        }
        s.write_all(&(2u32 << 30).to_le_bytes()).unwrap();
        let reply = read_until_closed(s);
        assert!(
            String::from_utf8_lossy(&reply).contains("exceeds the limit"),
            "{reply:?}"
        );
    }
    wait_for_rejections(&server, 2);
    client(&server).set("fine", b"yes").unwrap();
}

#[test]
fn random_bytes_never_hurt_the_server() {
    let server = server();
    let mut good = client(&server);
    // xorshift: deterministic, no dependency.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for i in 0..150 {
        let mut s = raw(&server);
        if i % 2 == 1 {
            hello(&mut s, TOKEN);
        }
        let len = (next() % 64) as usize + 1;
        let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if i % 3 == 0 && len >= 4 {
            // A plausible small length prefix followed by garbage.
            bytes[..4].copy_from_slice(&((len as u32) - 4).to_le_bytes());
        }
        let _ = s.write_all(&bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        read_until_closed(s);
        good.add("survived", 1).unwrap();
    }
    assert_eq!(good.get("survived").unwrap(), b"150");
    assert!(server.stats().rejected >= 100, "{:?}", server.stats());
}

#[test]
fn silent_connections_are_dropped_after_the_handshake_timeout() {
    let server = server();
    let s = raw(&server);
    let start = Instant::now();
    let reply = read_until_closed(s);
    assert!(start.elapsed() < Duration::from_secs(3));
    assert!(
        String::from_utf8_lossy(&reply).contains("hello"),
        "{reply:?}"
    );
}

#[test]
fn clients_never_hang_on_a_dead_or_silent_server() {
    // Nothing listening: retry until the timeout, then a message that says what to check.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let start = Instant::now();
    let err = StoreClient::connect("127.0.0.1", port, TOKEN, Duration::from_secs(1)).unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(3));
    let expected = format!("cannot reach rendezvous store at 127.0.0.1:{port} after 1 s (is node 0 running? firewall?)");
    assert!(err.to_string().starts_with(&expected), "{err}");

    // Something listening that never answers the hello.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let start = Instant::now();
    let err = StoreClient::connect("127.0.0.1", port, TOKEN, Duration::from_secs(1)).unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "{:?}",
        start.elapsed()
    );
    assert!(matches!(err, StoreError::Unreachable { .. }), "{err}");

    // The server goes away while a client waits.
    let srv = server();
    let mut c = client(&srv);
    let handle = std::thread::spawn(move || c.get_timeout("never", Duration::from_secs(30)));
    std::thread::sleep(Duration::from_millis(100));
    let start = Instant::now();
    drop(srv);
    assert!(handle.join().unwrap().is_err());
    assert!(start.elapsed() < Duration::from_secs(3));
}

#[test]
fn oversized_values_are_refused_by_the_client() {
    let server = server();
    let mut c = client(&server);
    let err = c.set("big", &vec![0u8; 33 << 20]).unwrap_err();
    assert!(matches!(err, StoreError::TooLarge { .. }), "{err}");
    c.set("small", b"ok").unwrap();
}

#[test]
fn port_in_use_is_a_clear_error() {
    let first = server();
    let err = StoreServer::bind(first.local_addr(), TOKEN).err().unwrap();
    assert!(matches!(err, StoreError::AddrInUse { .. }), "{err}");
    assert!(err.to_string().contains("--master-port"), "{err}");
}
