//! Opens under and outside watched trees: resolved absolute paths, identity, read/write,
//! failures.

use std::{
    ffi::CString,
    fs::OpenOptions,
    io::Write as _,
    os::unix::{ffi::OsStrExt as _, process::CommandExt as _},
    path::Path,
    process::Command,
};

use integration_tests::{Agent, TestDir, as_i64, as_u64, gettid, is, opens_where, set_mode};
use serde_json::Value;

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("no NUL in path")
}

fn open_record(agent: &mut Agent, what: &str, path: &Path) -> Value {
    agent.wait_for(what, is::open_of(path))
}

#[test]
fn absolute_open_carries_resolved_path_identity_and_access() {
    let w = TestDir::new("abs");
    let file = w.file("chart.txt", "synthetic record\n");
    let mut agent = Agent::start(["--watch".as_ref(), w.path().as_os_str()]);

    let tid = gettid();
    std::fs::read(&file).expect("read watched file");
    let r = open_record(&mut agent, "read open of the watched file", &file);
    let o = &r["open"];
    assert_eq!(o["pathSource"], "PATH_SOURCE_FILE");
    assert_eq!(o["read"], true);
    assert_eq!(o["write"], false);
    assert_eq!(o["outcome"]["success"], true);
    assert!(as_i64(&o["outcome"]["ret"]) >= 0);
    assert_eq!(o["watch"].as_str(), w.path().to_str());
    assert_eq!(as_u64(&r["process"]["pid"]), u64::from(std::process::id()));
    assert_eq!(as_u64(&r["process"]["tid"]), u64::from(tid));
    assert_eq!(r["process"]["identity"]["uid"], 0);
    assert_eq!(r["process"]["identity"]["euid"], 0);
    let meta = std::fs::metadata(&file).expect("stat");
    assert_eq!(
        as_u64(&o["inode"]),
        std::os::unix::fs::MetadataExt::ino(&meta)
    );

    let mut f = OpenOptions::new()
        .append(true)
        .open(&file)
        .expect("open for writing");
    f.write_all(b"more\n").expect("write");
    let r = agent.wait_for("write open of the watched file", |r| {
        is::open_of(&file)(r) && r["open"]["write"] == true
    });
    assert_eq!(r["open"]["read"], false);
    assert_eq!(r["open"]["create"], false);

    let created = w.path().join("new.txt");
    std::fs::write(&created, b"x").expect("create");
    let r = open_record(&mut agent, "create of a new file", &created);
    assert_eq!(r["open"]["create"], true);
    assert_eq!(r["open"]["truncate"], true);
    assert_eq!(r["open"]["write"], true);
    assert_ne!(as_u64(&r["open"]["mode"]), 0);
    agent.stop();
}

#[test]
fn relative_dirfd_symlink_and_dotdot_opens_resolve_to_the_absolute_path() {
    let w = TestDir::new("rel");
    let file = w.file("sub/chart.txt", "synthetic\n");
    let outside = TestDir::new("outside");
    std::os::unix::fs::symlink(&file, outside.path().join("file-link")).expect("file symlink");
    std::os::unix::fs::symlink(w.path().join("sub"), outside.path().join("dir-link"))
        .expect("dir symlink");
    let mut agent = Agent::start(["--watch".as_ref(), w.path().as_os_str()]);

    // Relative to the working directory, in a child that changed directory.
    let child = Command::new("cat")
        .arg("chart.txt")
        .current_dir(w.path().join("sub"))
        .output()
        .expect("run cat");
    assert!(child.status.success());
    let r = agent.wait_for("relative open by cat", |r| {
        is::open_of(&file)(r) && r["process"]["comm"] == "cat"
    });
    assert_eq!(r["process"]["exe"], "/usr/bin/cat");
    assert_eq!(r["open"]["pathSource"], "PATH_SOURCE_FILE");

    // Relative to a directory file descriptor.
    let dir = std::fs::File::open(w.path().join("sub")).expect("open dir");
    let name = CString::new("chart.txt").expect("cstring");
    // SAFETY: valid dirfd and C string.
    let fd = unsafe {
        libc::openat(
            std::os::fd::AsRawFd::as_raw_fd(&dir),
            name.as_ptr(),
            libc::O_RDONLY,
        )
    };
    assert!(fd >= 0, "openat failed");
    let r = agent.wait_for("openat relative to a dirfd", |r| {
        is::open_of(&file)(r) && is::from_pid(r, std::process::id())
    });
    assert_eq!(r["open"]["syscall"], "OPEN_SYSCALL_OPENAT");
    assert_eq!(as_i64(&r["open"]["outcome"]["ret"]), i64::from(fd));
    // SAFETY: closing the fd opened above.
    unsafe { libc::close(fd) };

    // Through a symlink that lives outside the tree, and a directory symlink.
    for via in [
        outside.path().join("file-link"),
        outside.path().join("dir-link/chart.txt"),
        w.path().join("sub/../sub/./chart.txt"),
    ] {
        let before = agent.history.len();
        std::fs::read(&via).expect("read via indirection");
        let r = agent.wait_for(&format!("open via {}", via.display()), |r| {
            is::open_of(&file)(r) && is::from_pid(r, std::process::id())
        });
        assert_eq!(r["open"]["path"].as_str(), file.to_str());
        assert!(agent.history.len() > before);
    }
    agent.stop();
}

#[test]
fn failed_opens_carry_the_error_and_the_attempted_absolute_path() {
    let w = TestDir::new("fail");
    let secret = w.file("secret.txt", "synthetic secret\n");
    set_mode(&secret, 0o600);
    let mut agent = Agent::start(["--watch".as_ref(), w.path().as_os_str()]);

    // ENOENT, absolute.
    let missing = w.path().join("missing.txt");
    assert!(std::fs::read(&missing).is_err());
    let r = open_record(&mut agent, "ENOENT open", &missing);
    assert_eq!(r["open"]["outcome"]["success"], false);
    assert_eq!(r["open"]["outcome"]["errno"], "ENOENT");
    assert_eq!(as_i64(&r["open"]["outcome"]["ret"]), -2);
    assert_eq!(r["open"]["pathSource"], "PATH_SOURCE_ATTEMPTED");

    // ENOENT, relative to the working directory of a child.
    let out = Command::new("cat")
        .arg("nope.txt")
        .current_dir(w.path())
        .output()
        .expect("run cat");
    assert!(!out.status.success());
    let r = open_record(
        &mut agent,
        "relative ENOENT open",
        &w.path().join("nope.txt"),
    );
    assert_eq!(r["open"]["requested"], "nope.txt");
    assert_eq!(r["open"]["outcome"]["errno"], "ENOENT");

    // ENOENT relative to a directory fd.
    let dir = std::fs::File::open(w.path()).expect("open dir");
    let name = CString::new("gone.txt").expect("cstring");
    // SAFETY: valid dirfd and C string.
    let fd = unsafe {
        libc::openat(
            std::os::fd::AsRawFd::as_raw_fd(&dir),
            name.as_ptr(),
            libc::O_RDONLY,
        )
    };
    assert_eq!(fd, -1);
    open_record(&mut agent, "dirfd ENOENT open", &w.path().join("gone.txt"));

    // EACCES for a non-root uid.
    let out = Command::new("cat")
        .arg(&secret)
        .uid(65534)
        .gid(65534)
        .output()
        .expect("run cat as nobody");
    assert!(
        !out.status.success(),
        "nobody must not read a 0600 root file"
    );
    let r = agent.wait_for("EACCES open as uid 65534", |r| {
        is::open_of(&secret)(r) && r["open"]["outcome"]["errno"] == "EACCES"
    });
    assert_eq!(r["process"]["identity"]["uid"], 65534);
    assert_eq!(r["process"]["identity"]["euid"], 65534);
    assert_eq!(r["process"]["identity"]["gid"], 65534);
    assert_eq!(as_i64(&r["open"]["outcome"]["ret"]), -13);
    agent.stop();
}

#[test]
fn opens_outside_the_watched_trees_produce_no_record() {
    let w = TestDir::new("in");
    let marker = w.file("marker.txt", "m\n");
    let other = TestDir::new("notwatched");
    let unwatched = other.file("data.txt", "not phi\n");
    let prefix_twin = format!("{}x", w.path().display());
    std::fs::create_dir_all(&prefix_twin).expect("twin dir");
    let twin_file = Path::new(&prefix_twin).join("f.txt");
    std::fs::write(&twin_file, b"t").expect("twin file");
    let mut agent = Agent::start(["--watch".as_ref(), w.path().as_os_str()]);

    for _ in 0..20 {
        std::fs::read(&unwatched).expect("read unwatched");
        let _ = std::fs::read(other.path().join("missing"));
        std::fs::read(&twin_file).expect("read twin");
        let _ = std::fs::read(format!("{prefix_twin}/missing"));
    }
    let _ = Command::new("cat")
        .arg("data.txt")
        .arg("../nothing-here")
        .current_dir(other.path())
        .output();
    std::fs::read(&marker).expect("read marker");
    let before = agent.records_until("the marker open", is::open_of(&marker));
    let watched = w.path().to_string_lossy().into_owned();
    let leaked = opens_where(&before, |p| {
        !p.starts_with(&watched) || p.starts_with(&prefix_twin)
    });
    assert!(
        leaked.is_empty(),
        "unwatched opens were recorded: {leaked:#?}"
    );
    let _ = std::fs::remove_dir_all(&prefix_twin);
    agent.stop();
}

#[test]
fn a_fork_without_exec_is_attributed_to_its_parent_even_after_it_exits() {
    let w = TestDir::new("fork");
    let file = w.file("chart.txt", "x\n");
    let path = cstr(&file);
    let mut agent = Agent::start(["--watch".as_ref(), w.path().as_os_str()]);

    // SAFETY: the child only calls async-signal-safe functions and exits.
    let child = unsafe { libc::fork() };
    if child == 0 {
        // SAFETY: in the child: open, close, _exit.
        unsafe {
            let fd = libc::open(path.as_ptr(), libc::O_RDONLY);
            libc::close(fd);
            libc::_exit(7);
        }
    }
    assert!(child > 0, "fork failed");
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(child, &mut status, 0) };
    let r = agent.wait_for("the forked child's open", |r| {
        is::open_of(&file)(r) && is::from_pid(r, child as u32)
    });
    assert_eq!(as_u64(&r["process"]["ppid"]), u64::from(std::process::id()));
    let exit = agent.wait_for("the forked child's exit record", |r| {
        r.get("exit").is_some() && is::from_pid(r, child as u32)
    });
    assert_eq!(exit["exit"]["status"], 7);
    agent.stop();
}

/// Directory and file names of every length around the kernel's ways of copying them (whole
/// words for short names, a helper copy for longer ones; inline and external dentry names)
/// come out whole, byte for byte, at every depth, UTF-8 included.
#[test]
fn names_of_every_length_are_copied_exactly() {
    let w = TestDir::new("names");
    let mut agent = Agent::start(["--watch".as_ref(), w.path().as_os_str()]);
    let lengths = [
        1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 39, 40, 41, 47, 48, 63, 64, 200, 255,
    ];
    let mut expected = Vec::new();
    for (i, len) in lengths.into_iter().enumerate() {
        // Each name differs in every byte from its neighbours, so a stray byte shows.
        let letter = (b'a' + (i % 26) as u8) as char;
        let dir: String = std::iter::repeat_n(letter.to_ascii_uppercase(), len).collect();
        let name: String = std::iter::repeat_n(letter, len).collect();
        let rel = format!("{dir}/x/{name}");
        expected.push(w.file(&rel, "synthetic\n"));
    }
    // Multi-byte characters: 13 × 3 bytes = 39, 14 × 3 = 42.
    for n in [13, 14] {
        let name: String = std::iter::repeat_n('é', n).collect::<String>() + "ü";
        expected.push(w.file(&format!("utf8/{name}"), "synthetic\n"));
    }
    for file in &expected {
        std::fs::read(file).expect("read watched file");
    }
    for file in &expected {
        let r = open_record(&mut agent, "open of a file with a long name", file);
        assert_eq!(r["open"]["path"].as_str(), file.to_str(), "{r}");
        assert_eq!(r["open"]["pathTruncated"], false, "{r}");
    }
    agent.stop();
}

/// Record times are the kernel's: an open is stamped when it happened (the clock is read at
/// most once per kernel tick on each CPU, so a stamp can be up to one tick early, never late
/// beyond the time it takes to see it), and the time between two opens is the time that
/// passed between them.
#[test]
fn records_are_stamped_with_the_time_the_kernel_saw_them() {
    let w = TestDir::new("time");
    let first = w.file("first.txt", "1\n");
    let second = w.file("second.txt", "2\n");
    let mut agent = Agent::start(["--watch".as_ref(), w.path().as_os_str()]);
    let time_of = |r: &Value| -> chrono::DateTime<chrono::Utc> {
        let text = r["time"].as_str().expect("a time");
        chrono::DateTime::parse_from_rfc3339(text)
            .unwrap_or_else(|e| panic!("time {text}: {e}"))
            .with_timezone(&chrono::Utc)
    };
    // A tick is at most 10 ms (HZ >= 100); the boot clock's conversion to UTC adds a little.
    let early = chrono::TimeDelta::milliseconds(25);

    let before = chrono::Utc::now();
    std::fs::read(&first).expect("read first");
    let after = chrono::Utc::now();
    let t1 = time_of(&open_record(&mut agent, "first open", &first));
    assert!(
        t1 >= before - early && t1 <= after + early,
        "first open stamped {t1}, done between {before} and {after}"
    );

    std::thread::sleep(std::time::Duration::from_millis(1500));
    std::fs::read(&second).expect("read second");
    let t2 = time_of(&open_record(&mut agent, "second open", &second));
    let between = (t2 - t1).num_milliseconds();
    assert!(
        (1500 - 25..=1500 + 250).contains(&between),
        "1.5 s passed between the opens; the records say {between} ms"
    );
    agent.stop();
}
