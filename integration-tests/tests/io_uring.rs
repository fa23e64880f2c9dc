//! Opens and renames through an io_uring: the kernel performs them for the ring, with no
//! system call of their own, and the agent must still record them.

use std::{ffi::CString, os::unix::ffi::OsStrExt as _, path::Path};

use integration_tests::{Agent, IoUringSetting, TestDir, as_i64, as_u64, is, opens_where, summary};
use io_uring::{IoUring, opcode, squeue, types};

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("no NUL in path")
}

/// Submits one request on `ring` and returns its result (a descriptor, or `-errno`).
fn complete(ring: &mut IoUring, entry: squeue::Entry) -> i32 {
    // SAFETY: every pointer the entry holds outlives this call, which waits for its
    // completion.
    unsafe { ring.submission().push(&entry) }.expect("room in the submission queue");
    ring.submit_and_wait(1).expect("io_uring_enter");
    ring.completion()
        .next()
        .expect("one completion after waiting for it")
        .result()
}

/// IORING_OP_OPENAT of `path` (relative to the working directory) for reading.
fn read_open(path: &CString) -> squeue::Entry {
    opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), path.as_ptr())
        .flags(libc::O_RDONLY)
        .build()
}

/// Opens `marker` and asserts that no open under `outside` was recorded before it.
fn nothing_recorded_under(agent: &mut Agent, outside: &Path, marker: &Path) {
    std::fs::read(marker).expect("read marker");
    let before = agent.records_until("the marker open", is::open_of(marker));
    let outside = outside.to_string_lossy().into_owned();
    let leaked = opens_where(&before, |p| p.starts_with(&outside));
    assert!(
        leaked.is_empty(),
        "unwatched opens were recorded: {leaked:#?}"
    );
}

/// A ring for the test, with io_uring open to root for as long as the guard lives.
fn ring() -> (IoUring, IoUringSetting) {
    integration_tests::require_root();
    let setting = IoUringSetting::set("0");
    let ring = IoUring::new(8).expect("io_uring_setup (kernel.io_uring_disabled=0)");
    (ring, setting)
}

#[test]
fn opens_through_an_io_uring_are_recorded_like_open_calls() {
    let w = TestDir::new("ring-open");
    let chart = w.file("chart.txt", "synthetic record\n");
    let notes = w.file("sub/notes.txt", "synthetic notes\n");
    let slot_file = w.file("slot.txt", "synthetic slot\n");
    let worked = w.file("worker.txt", "synthetic worker\n");
    let marker = w.file("marker.txt", "m\n");
    let other = TestDir::new("ring-outside");
    let unwatched = other.file("data.txt", "not phi\n");
    let (mut ring, _setting) = ring();
    let mut agent = Agent::start(["--watch".as_ref(), w.path().as_os_str()]);
    let sensors = &agent.history[0]["agent"]["sensors"];
    assert!(
        sensors
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["kind"] == "io-uring"
                && s["hook"] == "tp_btf/io_uring_complete, tp_btf/io_uring_submit_req")),
        "{sensors}"
    );

    // IORING_OP_OPENAT, absolute path, for reading.
    let path = cstr(&chart);
    let fd = complete(
        &mut ring,
        opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), path.as_ptr())
            .flags(libc::O_RDONLY | libc::O_CLOEXEC)
            .build(),
    );
    assert!(fd >= 0, "open through the ring: errno {}", -fd);
    let r = agent.wait_for("the ring's open of the watched file", is::open_of(&chart));
    let o = &r["open"];
    assert_eq!(
        o["syscall"],
        "OPEN_SYSCALL_IO_URING_OPENAT",
        "{}",
        summary(&r)
    );
    assert_eq!(o["pathSource"], "PATH_SOURCE_FILE");
    assert_eq!(o["read"], true);
    assert_eq!(o["write"], false);
    assert_eq!(o["outcome"]["success"], true);
    assert_eq!(as_i64(&o["outcome"]["ret"]), i64::from(fd));
    assert_eq!(o["watch"].as_str(), w.path().to_str());
    // Attributed to this process (the completion may come from one of its io_uring
    // threads), with its identity.
    assert_eq!(as_u64(&r["process"]["pid"]), u64::from(std::process::id()));
    assert_eq!(r["process"]["identity"]["uid"], 0);
    let meta = std::fs::metadata(&chart).expect("stat");
    assert_eq!(
        as_u64(&o["inode"]),
        std::os::unix::fs::MetadataExt::ino(&meta)
    );
    // SAFETY: the descriptor the ring opened, closed once.
    unsafe { libc::close(fd) };

    // Done by one of the ring's worker threads (IOSQE_ASYNC), not by this thread.
    let path = cstr(&worked);
    let fd = complete(&mut ring, read_open(&path).flags(squeue::Flags::ASYNC));
    assert!(fd >= 0, "open by a ring worker: errno {}", -fd);
    let r = agent.wait_for("the ring worker's open", is::open_of(&worked));
    assert_eq!(as_u64(&r["process"]["pid"]), u64::from(std::process::id()));
    assert_eq!(as_i64(&r["open"]["outcome"]["ret"]), i64::from(fd));
    // SAFETY: as above.
    unsafe { libc::close(fd) };

    // IORING_OP_OPENAT2, relative to a directory descriptor, for appending.
    let sub = std::fs::File::open(w.path().join("sub")).expect("open sub");
    let name = CString::new("notes.txt").expect("name");
    let how = types::OpenHow::new().flags((libc::O_WRONLY | libc::O_APPEND) as u64);
    let fd = complete(
        &mut ring,
        opcode::OpenAt2::new(
            types::Fd(std::os::fd::AsRawFd::as_raw_fd(&sub)),
            name.as_ptr(),
            &how,
        )
        .build(),
    );
    assert!(fd >= 0, "openat2 through the ring: errno {}", -fd);
    let r = agent.wait_for(
        "the ring's openat2 of the watched file",
        is::open_of(&notes),
    );
    assert_eq!(r["open"]["syscall"], "OPEN_SYSCALL_IO_URING_OPENAT2");
    assert_eq!(r["open"]["write"], true);
    assert_eq!(r["open"]["read"], false);
    // SAFETY: as above.
    unsafe { libc::close(fd) };

    // Into a direct descriptor (the ring's own table): no entry in the file table at all.
    ring.submitter()
        .register_files_sparse(4)
        .expect("register a sparse file table");
    let path = cstr(&slot_file);
    let slot = complete(
        &mut ring,
        opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), path.as_ptr())
            .flags(libc::O_RDONLY)
            .file_index(Some(types::DestinationSlot::auto_target()))
            .build(),
    );
    assert!(slot >= 0, "open into a direct descriptor: errno {}", -slot);
    let r = agent.wait_for(
        "the ring's open into a direct descriptor",
        is::open_of(&slot_file),
    );
    assert_eq!(r["open"]["syscall"], "OPEN_SYSCALL_IO_URING_OPENAT");
    assert_eq!(as_i64(&r["open"]["outcome"]["ret"]), i64::from(slot));
    // And into a slot the caller names.
    let fixed = complete(
        &mut ring,
        opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), cstr(&chart).as_ptr())
            .flags(libc::O_RDONLY)
            .file_index(Some(
                types::DestinationSlot::try_from_slot_target(3).expect("slot 3"),
            ))
            .build(),
    );
    assert_eq!(fixed, 0, "open into slot 3");
    agent.wait_for("the ring's open into slot 3", |r| {
        is::open_of(&chart)(r) && as_i64(&r["open"]["outcome"]["ret"]) == 0
    });

    // Outside every watched tree: nothing.
    let path = cstr(&unwatched);
    for _ in 0..5 {
        let fd = complete(&mut ring, read_open(&path));
        assert!(fd >= 0, "open outside: errno {}", -fd);
        // SAFETY: as above.
        unsafe { libc::close(fd) };
    }
    nothing_recorded_under(&mut agent, &other.path(), &marker);
    let stopped = agent.stop();
    assert!(stopped.status.success(), "{}", stopped.stderr);
}

#[test]
fn failed_opens_through_an_io_uring_are_recorded_with_the_name_they_were_given() {
    let w = TestDir::new("ring-fail");
    let marker = w.file("marker.txt", "m\n");
    let other = TestDir::new("ring-fail-outside");
    let (mut ring, _setting) = ring();
    let mut agent = Agent::start(["--watch".as_ref(), w.path().as_os_str()]);
    let sensors = &agent.history[0]["agent"]["sensors"];
    assert!(
        sensors
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["kind"] == "io-uring"
                && s["hook"] == "tp_btf/io_uring_complete, tp_btf/io_uring_submit_req")),
        "{sensors}"
    );
    assert!(
        agent.history[0]["agent"]["limitations"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|l| !l.as_str().unwrap_or("").contains("fails is not recorded")),
        "{}",
        agent.history[0]["agent"]
    );

    // ENOENT, absolute; the buffer holding the name is overwritten as soon as the request
    // is submitted, so the record can only carry the name the kernel was given.
    let missing = w.path().join("missing.txt");
    let mut name = cstr(&missing).into_bytes_with_nul();
    // SAFETY: `name` outlives the submission, which copies it.
    unsafe {
        ring.submission()
            .push(
                &opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), name.as_ptr().cast())
                    .flags(libc::O_RDONLY)
                    .build(),
            )
            .expect("room in the submission queue");
    }
    ring.submit().expect("io_uring_enter");
    name.fill(b'x');
    ring.submit_and_wait(1).expect("wait for the completion");
    let res = ring.completion().next().expect("one completion").result();
    assert_eq!(res, -libc::ENOENT);
    let r = agent.wait_for("the ring's failed open", is::open_of(&missing));
    let o = &r["open"];
    assert_eq!(
        o["syscall"],
        "OPEN_SYSCALL_IO_URING_OPENAT",
        "{}",
        summary(&r)
    );
    assert_eq!(o["outcome"]["success"], false);
    assert_eq!(o["outcome"]["errno"], "ENOENT");
    assert_eq!(as_i64(&o["outcome"]["ret"]), -2);
    assert_eq!(o["pathSource"], "PATH_SOURCE_ATTEMPTED");
    assert_eq!(o["watch"].as_str(), w.path().to_str());
    assert_eq!(as_u64(&r["process"]["pid"]), u64::from(std::process::id()));

    // Relative to a directory descriptor, through openat2, done by a ring worker thread:
    // named by the directory's path and the name given.
    let dir = std::fs::File::open(w.path()).expect("open the watched directory");
    let name = CString::new("gone.txt").expect("name");
    let how = types::OpenHow::new().flags(libc::O_RDONLY as u64);
    let res = complete(
        &mut ring,
        opcode::OpenAt2::new(
            types::Fd(std::os::fd::AsRawFd::as_raw_fd(&dir)),
            name.as_ptr(),
            &how,
        )
        .build()
        .flags(squeue::Flags::ASYNC),
    );
    assert_eq!(res, -libc::ENOENT);
    let gone = w.path().join("gone.txt");
    let r = agent.wait_for("the ring worker's failed openat2", is::open_of(&gone));
    assert_eq!(r["open"]["syscall"], "OPEN_SYSCALL_IO_URING_OPENAT2");
    assert_eq!(r["open"]["requested"], "gone.txt");
    assert_eq!(r["open"]["outcome"]["errno"], "ENOENT");
    assert_eq!(as_u64(&r["process"]["pid"]), u64::from(std::process::id()));
    drop(dir);

    // A successful open that asks for no completion entry on success
    // (IOSQE_CQE_SKIP_SUCCESS) is recorded all the same.
    let skipped = w.file("skipped.txt", "synthetic\n");
    let path = cstr(&skipped);
    // SAFETY: `path` outlives the submission, which copies it.
    unsafe {
        ring.submission()
            .push(&read_open(&path).flags(squeue::Flags::SKIP_SUCCESS))
            .expect("room in the submission queue");
    }
    ring.submit().expect("io_uring_enter");
    let r = agent.wait_for(
        "the ring's open that posts no completion entry",
        is::open_of(&skipped),
    );
    assert_eq!(r["open"]["outcome"]["success"], true);

    // Failures outside every watched tree: nothing.
    let absent = other.path().join("absent.txt");
    let path = cstr(&absent);
    for _ in 0..5 {
        assert_eq!(complete(&mut ring, read_open(&path)), -libc::ENOENT);
    }
    nothing_recorded_under(&mut agent, &other.path(), &marker);
    let stopped = agent.stop();
    assert!(stopped.status.success(), "{}", stopped.stderr);
    assert_eq!(stopped.drops("readFailure"), 0, "{}", stopped.stderr);
}

#[test]
fn a_directory_renamed_through_an_io_uring_is_judged_at_its_new_place() {
    let w = TestDir::new("ring-rename-in");
    let marker = w.file("marker.txt", "m\n");
    let other = TestDir::new("ring-rename-out");
    let moved = other.file("ward/chart.txt", "synthetic\n");
    let (mut ring, _setting) = ring();
    let mut agent = Agent::start(["--watch".as_ref(), w.path().as_os_str()]);

    // Opened outside first, so the kernel remembers the directory as unwatched.
    for _ in 0..3 {
        std::fs::read(&moved).expect("read outside");
    }
    let from = cstr(&other.path().join("ward"));
    let to_path = w.path().join("ward");
    let to = cstr(&to_path);
    let renamed = complete(
        &mut ring,
        opcode::RenameAt::new(
            types::Fd(libc::AT_FDCWD),
            from.as_ptr(),
            types::Fd(libc::AT_FDCWD),
            to.as_ptr(),
        )
        .build(),
    );
    assert_eq!(renamed, 0, "rename through the ring: errno {}", -renamed);
    let inside = to_path.join("chart.txt");
    std::fs::read(&inside).expect("read at the new place");
    let r = agent.wait_for(
        "the open of the file in the directory renamed into the watched tree",
        is::open_of(&inside),
    );
    assert_eq!(r["open"]["outcome"]["success"], true);
    std::fs::read(&marker).expect("read marker");
    agent.wait_for("the marker open", is::open_of(&marker));
    let stopped = agent.stop();
    assert!(stopped.status.success(), "{}", stopped.stderr);
}
