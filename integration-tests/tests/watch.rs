//! The watch list changes while the agent runs (SIGHUP re-reads the config file).

use integration_tests::{Agent, TestDir, is, summary};

fn write_config(path: &std::path::Path, dirs: &[&std::path::Path]) {
    let list: Vec<String> = dirs
        .iter()
        .map(|d| format!("{:?}", d.display().to_string()))
        .collect();
    std::fs::write(path, format!("watch = [{}]\n", list.join(", "))).expect("write config");
}

#[test]
fn a_directory_added_at_run_time_takes_effect_without_restart() {
    let a = TestDir::new("watch-a");
    let b = TestDir::new("watch-b");
    let a_file = a.file("a.txt", "a\n");
    let b_file = b.file("b.txt", "b\n");
    let b_marker = b.file("marker.txt", "m\n");
    let conf_dir = TestDir::new("conf");
    let conf = conf_dir.path().join("agent.toml");
    write_config(&conf, &[&a.path()]);
    let mut agent = Agent::start(["--config".as_ref(), conf.as_os_str()]);

    // Not watched yet.
    std::fs::read(&b_file).expect("read b");
    std::fs::read(&a_file).expect("read a");
    let before = agent.records_until("open in A", is::open_of(&a_file));
    assert!(
        !before.iter().any(is::open_of(&b_file)),
        "B was recorded before it was watched"
    );

    write_config(&conf, &[&a.path(), &b.path()]);
    agent.signal(libc::SIGHUP);
    let change = agent.wait_for("the config change record", |r| {
        r.get("configChange").is_some()
    });
    let added = &change["configChange"]["watchAdded"];
    assert_eq!(added[0].as_str(), b.path().to_str(), "{change}");
    std::fs::read(&b_file).expect("read b");
    agent.wait_for("open in B after it was added", is::open_of(&b_file));

    // Removing A stops its records.
    write_config(&conf, &[&b.path()]);
    agent.signal(libc::SIGHUP);
    let change = agent.wait_for("the second config change", |r| {
        r.get("configChange").is_some()
    });
    assert_eq!(
        change["configChange"]["watchRemoved"][0].as_str(),
        a.path().to_str()
    );
    std::fs::read(&a_file).expect("read a");
    std::fs::read(&b_marker).expect("read marker");
    let between = agent.records_until("marker in B", is::open_of(&b_marker));
    let leaked: Vec<String> = between
        .iter()
        .filter(|r| is::open_of(&a_file)(r))
        .map(summary)
        .collect();
    assert!(
        leaked.is_empty(),
        "A still recorded after removal: {leaked:?}"
    );

    // A broken config file changes nothing and is reported.
    std::fs::write(&conf, "watch = [\"/tmp\"]\nbogus_key = 1\n").expect("write");
    agent.signal(libc::SIGHUP);
    let change = agent.wait_for("the refused reload", |r| r.get("configChange").is_some());
    let errors = change["configChange"]["errors"].to_string();
    assert!(errors.contains("bogus_key"), "{errors}");
    assert_eq!(
        change["configChange"]["watch"][0].as_str(),
        b.path().to_str()
    );
    std::fs::read(&b_file).expect("read b");
    agent.wait_for(
        "B still recorded after a refused reload",
        is::open_of(&b_file),
    );

    // The accept ports need a restart: a reload applies the watch list and says so.
    std::fs::write(
        &conf,
        format!(
            "watch = [{:?}]\naccept_ports = [5432]\n",
            b.path().display().to_string()
        ),
    )
    .expect("write");
    agent.signal(libc::SIGHUP);
    let change = agent.wait_for("the reload with accept ports", |r| {
        r.get("configChange").is_some()
    });
    let errors = change["configChange"]["errors"].to_string();
    assert!(
        errors.contains("accept_ports [5432] differ from the running agent's []")
            && errors.contains("restarts"),
        "{errors}"
    );
    assert_eq!(
        change["configChange"]["watch"][0].as_str(),
        b.path().to_str()
    );
    agent.stop();
}

#[test]
fn a_watched_directory_deleted_and_recreated_is_watched_again() {
    let parent = TestDir::new("recreate");
    let dir = parent.path().join("ehr");
    std::fs::create_dir(&dir).expect("mkdir");
    let mut agent = Agent::start(["--watch".as_ref(), dir.as_os_str()]);
    std::fs::remove_dir_all(&dir).expect("remove");
    std::fs::create_dir(&dir).expect("recreate");
    let file = dir.join("chart.txt");
    std::fs::write(&file, b"x").expect("write");
    // The agent re-checks its watch list every few seconds.
    let seen = (0..40).any(|_| {
        std::fs::read(&file).expect("read");
        agent
            .try_wait_for(std::time::Duration::from_millis(500), is::open_of(&file))
            .is_some()
    });
    assert!(seen, "opens in the recreated directory were never recorded");
    agent.stop();
}
