//! `hikkoshi demo`, the README's first command, run as a new user runs it: the whole story ends with a
//! measured write pause and a verification, and leaves nothing running.

use crate::common::*;

#[test]
fn the_demo_tells_the_whole_story_and_cleans_up() {
    let out = hikkoshi(&["demo"]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    for step in [
        "hikkoshi check",
        "ready: no blocker",
        "hikkoshi clone --follow",
        "copied, indexed, and streaming",
        "hikkoshi verify",
        "hikkoshi cutover",
        "write pause measured by hikkoshi",
        "the application's longest wait",
        "verified while fenced",
        "servers stopped and removed",
    ] {
        assert!(t.contains(step), "the demo never showed {step:?}:\n{t}");
    }
    // the application really moved: it committed on the new primary after the switch
    let after: u64 = t
        .lines()
        .find_map(|l| {
            l.strip_prefix("after the switch the application committed ")
                .and_then(|r| r.split_whitespace().next())
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or_else(|| panic!("no count of commits after the switch:\n{t}"));
    assert!(
        after > 0,
        "the application wrote nothing on the new primary:\n{t}"
    );
    // the demo's servers are gone
    let ports: Vec<u16> = t
        .lines()
        .find(|l| l.starts_with("source: PostgreSQL"))
        .unwrap()
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .filter(|p| *p > 1024)
        .collect();
    assert_eq!(ports.len(), 2, "{t}");
    for p in ports {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", p)).is_err(),
            "a demo server still listens on port {p}"
        );
    }
}
