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
