//! A burst that overflows a small ring buffer is counted, never silent.

use std::{ffi::CString, os::unix::ffi::OsStrExt as _};

use integration_tests::{Agent, TestDir, is};

#[test]
fn ring_buffer_overflow_is_counted_and_recorded() {
    const OPENS: u64 = 50_000;
    let w = TestDir::new("burst");
    let file = w.file("chart.txt", "x\n");
    let agent = Agent::start([
        "--watch".as_ref(),
        w.path().as_os_str(),
        "--ring-buffer-bytes".as_ref(),
        "4096".as_ref(),
        "--no-connect".as_ref(),
    ]);
    let path = CString::new(file.as_os_str().as_bytes()).expect("cstring");
    // Freeze the reader so the burst must overflow the one-page ring buffer.
    agent.signal(libc::SIGSTOP);
    for _ in 0..OPENS {
        // SAFETY: open/close of a valid path.
        unsafe {
            let fd = libc::open(path.as_ptr(), libc::O_RDONLY);
            assert!(fd >= 0);
            libc::close(fd);
        }
    }
    agent.signal(libc::SIGCONT);
    let stopped = agent.stop();
    assert!(stopped.status.success(), "agent failed: {}", stopped.stderr);
    let ours = stopped
        .history
        .iter()
        .filter(|r| is::open_of(&file)(r) && is::from_pid(r, std::process::id()))
        .count() as u64;
    let lost = stopped.drops("ringBufferFull");
    assert!(
        lost > 0,
        "a 4 KiB ring buffer cannot take {OPENS} opens at once"
    );
    assert!(ours < OPENS);
    assert!(
        ours + lost >= OPENS,
        "{OPENS} opens: {ours} recorded + {lost} counted as lost leaves some unaccounted for"
    );
    assert!(
        stopped
            .history
            .iter()
            .any(|r| r["gap"]["reason"] == "GAP_REASON_RING_BUFFER_FULL"),
        "the loss is a gap record"
    );
    assert!(
        stopped.stderr.contains("ring_buffer_full="),
        "the drop counters are printed on stop: {}",
        stopped.stderr
    );
}

/// A small ring buffer wraps around hundreds of times while the agent keeps up: every open
/// that is not counted as lost arrives whole and in the order it was made, also where a
/// record straddles the end of the ring.
#[test]
fn a_small_ring_buffer_wraps_without_reordering_or_corrupting_records() {
    const OPENS: usize = 3_000;
    let w = TestDir::new("wrap");
    // Names of varying length, so records end at every offset of the ring.
    let files: Vec<std::path::PathBuf> = (0..37)
        .map(|i| w.file(&format!("{}-{i}.txt", "n".repeat(i * 3 + 1)), "x\n"))
        .collect();
    let mut agent = Agent::start([
        "--watch".as_ref(),
        w.path().as_os_str(),
        "--ring-buffer-bytes".as_ref(),
        "16384".as_ref(),
        "--no-connect".as_ref(),
    ]);
    let mut expected = Vec::with_capacity(OPENS);
    for i in 0..OPENS {
        let file = &files[i % files.len()];
        let path = CString::new(file.as_os_str().as_bytes()).expect("cstring");
        // SAFETY: open/close of a valid path.
        unsafe {
            let fd = libc::open(path.as_ptr(), libc::O_RDONLY);
            assert!(fd >= 0);
            libc::close(fd);
        }
        expected.push(file.to_string_lossy().into_owned());
        if i % 16 == 15 {
            // Leave the agent time to drain: a one-page-per-16-records pace.
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }
    let marker = w.file("marker.txt", "m\n");
    std::fs::read(&marker).expect("read marker");
    agent.wait_for("the marker open", is::open_of(&marker));
    let stopped = agent.stop();
    assert!(stopped.status.success(), "agent failed: {}", stopped.stderr);
    let seen: Vec<String> = stopped
        .history
        .iter()
        .filter(|r| is::from_pid(r, std::process::id()))
        .filter_map(|r| r["open"]["path"].as_str().map(str::to_owned))
        .filter(|p| p.ends_with(".txt") && !p.ends_with("marker.txt"))
        .collect();
    let lost = stopped.drops("ringBufferFull") as usize;
    // 3,000 records of about 200 bytes pass through 16 KiB: dozens of laps.
    assert!(
        seen.len() >= OPENS / 2,
        "only {} of {OPENS} opens recorded ({lost} lost): the ring did not wrap enough to test",
        seen.len()
    );
    assert!(
        seen.len() + lost >= OPENS,
        "{} recorded + {lost} lost of {OPENS}",
        seen.len()
    );
    // Whatever was recorded is a subsequence of what was done, in order, each name whole.
    let mut next = expected.iter();
    for (k, path) in seen.iter().enumerate() {
        assert!(
            next.any(|e| e == path),
            "record {k} ({path}) is out of order or not a path that was opened"
        );
    }
}
