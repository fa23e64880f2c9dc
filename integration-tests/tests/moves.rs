//! The kernel remembers which directories are outside the watched trees, and the paths of
//! the directories files are opened in. Renames and mounts change both, and must be noticed
//! at once: these tests open files before and after.

use std::{ffi::CString, os::unix::ffi::OsStrExt as _, process::Command};

use integration_tests::{Agent, TestDir, as_u64, is, summary};

/// A mount made by a test: unmounted explicitly, or lazily when dropped so that a failing
/// test leaves no mounts behind.
struct Mounted(Option<std::path::PathBuf>);

impl Mounted {
    fn new(path: std::path::PathBuf) -> Self {
        Mounted(Some(path))
    }

    fn unmount(mut self) {
        if let Some(p) = self.0.take() {
            run(Command::new("umount").arg(p));
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = Command::new("umount").arg("-l").arg(p).status();
        }
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run command");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_directory_renamed_into_the_tree_is_watched_at_once_and_out_of_it_is_not() {
    let w = TestDir::new("move-in");
    let outside = TestDir::new("move-out");
    let dir = outside.path().join("records");
    let file = outside.file("records/chart.txt", "x\n");
    let marker = w.file("marker.txt", "m\n");
    let mut agent = Agent::start(["--watch".as_ref(), w.path().as_os_str()]);

    // Opened while outside: the kernel remembers the directory as unwatched.
    for _ in 0..3 {
        std::fs::read(&file).expect("read outside");
    }
    let moved = w.path().join("records");
    std::fs::rename(&dir, &moved).expect("rename into the tree");
    let moved_file = moved.join("chart.txt");
    std::fs::read(&moved_file).expect("read after the move");
    agent.wait_for(
        "the open after the directory moved in",
        is::open_of(&moved_file),
    );

    // And back out: no more records.
    std::fs::rename(&moved, &dir).expect("rename out of the tree");
    std::fs::read(&file).expect("read after moving out");
    std::fs::read(&marker).expect("read marker");
    let between = agent.records_until("the marker", is::open_of(&marker));
    let leaked: Vec<String> = between
        .iter()
        .filter(|r| is::open_of(&file)(r))
        .map(summary)
        .collect();
    assert!(leaked.is_empty(), "recorded after moving out: {leaked:?}");

    // A parent two levels up moved in: the remembered grandchild must not hide it.
    let deep_dir = outside.path().join("a/b/c");
    let deep = outside.file("a/b/c/deep.txt", "d\n");
    std::fs::read(&deep).expect("read deep outside");
    std::fs::rename(outside.path().join("a"), w.path().join("a")).expect("move ancestor in");
    let deep_moved = w.path().join("a/b/c/deep.txt");
    std::fs::read(&deep_moved).expect("read deep after the move");
    agent.wait_for(
        "the deep open after its ancestor moved in",
        is::open_of(&deep_moved),
    );
    assert!(!deep_dir.exists());
    agent.stop();
}

#[test]
fn a_file_is_named_from_its_directory_s_new_place_and_from_its_opener_s_root() {
    let w = TestDir::new("dir-paths");
    let file = w.file("ward/a/chart.txt", "x\n");
    let marker = w.file("marker.txt", "m\n");
    let mut agent = Agent::start(["--watch".as_ref(), w.path().as_os_str()]);

    // The directory's path is remembered after the first open.
    for _ in 0..3 {
        std::fs::read(&file).expect("read");
    }
    agent.wait_for("the open before the rename", is::open_of(&file));

    // An ancestor renamed inside the tree: the next open carries the new path.
    let unit = w.path().join("unit");
    std::fs::rename(w.path().join("ward"), &unit).expect("rename the ancestor");
    let moved = unit.join("a/chart.txt");
    std::fs::read(&moved).expect("read after the rename");
    agent.wait_for("the open after the rename", is::open_of(&moved));
    std::fs::read(&moved).expect("read again");

    // A process whose root is `unit` names the same file from its own root.
    let root = CString::new(unit.as_os_str().as_bytes()).expect("no NUL");
    // SAFETY: the child only makes system calls (chroot, open, _exit), which are safe after
    // fork in a threaded process.
    let child = unsafe { libc::fork() };
    assert!(child >= 0, "fork");
    if child == 0 {
        // SAFETY: plain system calls on NUL-terminated strings; the child exits at once.
        unsafe {
            let ok = libc::chroot(root.as_ptr()) == 0
                && libc::chdir(c"/".as_ptr()) == 0
                && libc::open(c"/a/chart.txt".as_ptr(), libc::O_RDONLY) >= 0;
            libc::_exit(if ok { 0 } else { 1 });
        }
    }
    let mut status = 0;
    // SAFETY: waits for the child just forked.
    unsafe { libc::waitpid(child, &mut status, 0) };
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "the chrooted child could not open its file (status {status})"
    );
    let r = agent.wait_for("the chrooted open", |r| {
        r["open"].is_object() && as_u64(&r["process"]["pid"]) == child as u64
    });
    assert_eq!(r["open"]["path"], "/a/chart.txt", "{}", summary(&r));

    // And a process at the host's root still gets the whole path.
    std::fs::read(&moved).expect("read after the chrooted open");
    std::fs::read(&marker).expect("read marker");
    let after = agent.records_until("the marker", is::open_of(&marker));
    let last = after
        .iter()
        .rev()
        .find(|r| {
            as_u64(&r["process"]["pid"]) == u64::from(std::process::id()) && r["open"].is_object()
        })
        .expect("this process's open before the marker");
    assert_eq!(
        last["open"]["path"].as_str(),
        moved.to_str(),
        "{}",
        summary(last)
    );
    agent.stop();
}

#[test]
fn filesystems_mounted_inside_the_tree_and_bind_mounts_of_it_are_watched() {
    let w = TestDir::new("mounts");
    let elsewhere = TestDir::new("bind-target");
    let inner = w.path().join("inner");
    std::fs::create_dir(&inner).expect("mkdir");
    let mut agent = Agent::start(["--watch".as_ref(), w.path().as_os_str()]);

    // A tmpfs mounted below the watched tree.
    run(Command::new("mount").args(["-t", "tmpfs", "phi-it", inner.to_str().expect("utf8")]));
    let _inner_mount = Mounted::new(inner.clone());
    let on_tmpfs = inner.join("scan.dcm");
    std::fs::write(&on_tmpfs, b"synthetic image").expect("write on tmpfs");
    let r = agent.wait_for("the open on the inner tmpfs", is::open_of(&on_tmpfs));
    assert_eq!(r["open"]["watch"].as_str(), w.path().to_str());

    // The watched tree bind-mounted elsewhere: same data, reported by the path used.
    let file = w.file("chart.txt", "x\n");
    run(Command::new("mount").args([
        "--bind",
        w.path().to_str().expect("utf8"),
        elsewhere.path().to_str().expect("utf8"),
    ]));
    let bind_mount = Mounted::new(elsewhere.path());
    let via_bind = elsewhere.path().join("chart.txt");
    std::fs::read(&via_bind).expect("read through the bind mount");
    let r = agent.wait_for("the open through the bind mount", |r| {
        is::open_of(&via_bind)(r) && is::from_pid(r, std::process::id())
    });
    assert_eq!(r["open"]["watch"].as_str(), w.path().to_str());
    bind_mount.unmount();

    // A filesystem used outside the tree, then moved into it: same mount, new place.
    let staging = TestDir::new("staging");
    run(Command::new("mount").args([
        "-t",
        "tmpfs",
        "phi-it2",
        staging.path().to_str().expect("utf8"),
    ]));
    let staged = staging.path().join("lab.csv");
    std::fs::write(&staged, b"a,b\n").expect("write staged");
    std::fs::read(&staged).expect("read staged");
    let landing = w.path().join("landing");
    std::fs::create_dir(&landing).expect("mkdir landing");
    run(Command::new("mount").args([
        "--move",
        staging.path().to_str().expect("utf8"),
        landing.to_str().expect("utf8"),
    ]));
    let _landing_mount = Mounted::new(landing.clone());
    let landed = landing.join("lab.csv");
    std::fs::read(&landed).expect("read after the move");
    agent.wait_for("the open on the moved mount", is::open_of(&landed));
    std::fs::read(&file).expect("read after unmounting the bind mount");
    agent.wait_for("the open after unmounting", is::open_of(&file));
    agent.stop();
}
