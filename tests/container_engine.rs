//! The container engine with real buildah (the container tier: `BUILDER_CONTAINER_TESTS=1`,
//! as root): the fixture base image imported into a private storage; a Containerfile whose
//! `RUN` runs the agent, driven through its socket as an `AgentMachine` (exec, reboot refused,
//! Poweroff ends the step); the built image holds the change and nothing of the agent; a
//! working container runs the agent with `buildah run`; a step whose host goes away fails the
//! build; a dead builder's container is recovered; nothing is left in the storage or mounted.
//!
//! One test does it all in order: importing the base image is most of the time.

#[path = "support/container_tier.rs"]
mod container_tier;

use std::time::Duration;

use builder::container::{AgentDir, Engine};
use builder::machine::{Capture, ExecRequest, Machine, MachineError};
use builder::undo::{Leftovers, Outcome, UndoList};

async fn exec(machine: &dyn Machine, script: &str) -> String {
    let capture = Capture::default();
    let outcome = machine
        .exec(&ExecRequest::argv(["sh", "-c", script]), &capture)
        .await
        .expect("exec");
    assert!(
        outcome.status.success(),
        "`{script}` {}: {}",
        outcome.status,
        String::from_utf8_lossy(&capture.stderr())
    );
    String::from_utf8_lossy(&capture.stdout()).into_owned()
}

/// `buildah build` of `containerfile` in `context`; its output lines and the image id.
fn start_build(
    engine: &Engine,
    context: &std::path::Path,
    containerfile: &str,
) -> (builder::container::Running, std::path::PathBuf) {
    let file = context.parent().expect("parent").join("Containerfile");
    fs_err::write(&file, containerfile).expect("write Containerfile");
    let iid = context.parent().expect("parent").join("iid");
    let _ = fs_err::remove_file(&iid);
    let args: Vec<String> = [
        "build",
        "--isolation",
        engine.isolation().as_str(),
        "--layers",
        "--pull-never",
        "--force-rm",
        "--iidfile",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        iid.display().to_string(),
        "-f".into(),
        file.display().to_string(),
        context.display().to_string(),
    ])
    .collect();
    (engine.start(&args).expect("start buildah build"), iid)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(container_tier),
    ignore = "container tier: set BUILDER_CONTAINER_TESTS=1 and BUILDER_TEST_CONTAINER (scripts/test does)"
)]
async fn the_agent_runs_a_build_step_and_a_working_container_and_nothing_is_left() {
    let base = container_tier::base_container();
    let root = tempfile::Builder::new()
        .prefix("ce-")
        .tempdir_in("/tmp")
        .expect("temp dir");
    let dir = root.path().join("containers");
    let _cleanup = container_tier::EngineDir(dir.clone());
    let engine = Engine::open(&dir).await.expect("open the engine");
    eprintln!(
        "isolation: {} ({})",
        engine.isolation().as_str(),
        engine.isolation_note().unwrap_or("the OCI runtime works")
    );
    if engine.isolation() == builder::container::Isolation::Chroot {
        assert!(
            engine
                .isolation_note()
                .is_some_and(|n| n.contains("--isolation chroot")),
            "a fallback is said: {:?}",
            engine.isolation_note()
        );
    }

    let parent = "localhost/builder-parent:test";
    engine
        .import(&format!("oci-archive:{}", base.display()), parent)
        .await
        .expect("import the base image");
    assert!(engine.has_image(parent).await);

    // 1. A build step through the agent.
    let context = root.path().join("context");
    fs_err::create_dir(&context).expect("mkdir context");
    let mut agents = AgentDir::create(&context.join(".builder"), 2).expect("agent dir");
    let mut connections = agents.connections().expect("listen");
    let containerfile = format!(
        "FROM {parent}\n{}\n{}\n",
        AgentDir::run_instruction(".builder", 1, "key-1"),
        AgentDir::run_instruction(".builder", 2, "key-2"),
    );
    let (build, iid) = start_build(&engine, &context, &containerfile);
    let (n, stream) = tokio::time::timeout(Duration::from_secs(120), connections.recv())
        .await
        .expect("the first RUN connects")
        .expect("a connection");
    assert_eq!(n, 1);
    let machine = Engine::agent_machine(stream, "container step 1".into())
        .await
        .expect("hello");
    let out = exec(
        &machine,
        "echo built > /etc/builder-test; id -u; ls /run/builder-agent",
    )
    .await;
    assert!(out.starts_with("0\n"), "{out}");
    match machine.reboot().await {
        Err(MachineError::Unsupported { hint, .. }) => {
            assert!(hint.contains("a container cannot reboot"), "{hint}")
        }
        other => panic!("a container's reboot is refused, got {other:?}"),
    }
    machine.poweroff().await.expect("poweroff");
    let (n, stream) = tokio::time::timeout(Duration::from_secs(120), connections.recv())
        .await
        .expect("the second RUN connects")
        .expect("a connection");
    assert_eq!(n, 2);
    let machine = Engine::agent_machine(stream, "container step 2".into())
        .await
        .expect("hello");
    assert_eq!(exec(&machine, "cat /etc/builder-test").await, "built\n");
    machine.poweroff().await.expect("poweroff");
    let mut output = Vec::new();
    build.wait(&mut output).await.expect("the build succeeds");
    let image = fs_err::read_to_string(&iid).expect("image id");

    // 2. Built again: both steps are cache hits and nobody connects.
    let (build, _) = start_build(&engine, &context, &containerfile);
    let mut output = Vec::new();
    build
        .wait(&mut output)
        .await
        .expect("the cached build succeeds");
    let cached = output.iter().filter(|l| l.contains("Using cache")).count();
    assert_eq!(cached, 2, "{output:#?}");
    assert!(
        connections.try_recv().is_err(),
        "a cached RUN never connects"
    );
    drop(connections);
    drop(agents);

    // 3. A working container of the image runs the agent with `buildah run`.
    let mut undo = UndoList::new(false, Leftovers::default());
    let name = engine
        .from_image(&image, "test", &mut undo)
        .await
        .expect("working container");
    // Nothing of the agent is in the image itself.
    let listed = engine
        .run(&[
            "run",
            "--isolation",
            engine.isolation().as_str(),
            &name,
            "--",
            "sh",
            "-c",
            "ls -A /run; ls /run/builder-agent 2>&1 || true",
        ])
        .await
        .expect("list /run");
    assert!(
        listed.ends_with("ls: cannot access '/run/builder-agent': No such file or directory\n")
            && !listed.lines().any(|l| l == "builder-agent"),
        "{listed}"
    );
    let mut agents = AgentDir::create(&root.path().join("agent-test"), 1).expect("agent dir");
    let mut connections = agents.connections().expect("listen");
    let run = engine
        .run_in(&name, &[agents.volume()], &AgentDir::agent_argv(1, None))
        .expect("buildah run");
    let (_, stream) = tokio::time::timeout(Duration::from_secs(60), connections.recv())
        .await
        .expect("buildah run's agent connects")
        .expect("a connection");
    let machine = Engine::agent_machine(stream, "test container".into())
        .await
        .expect("hello");
    let out = exec(
        &machine,
        "cat /etc/builder-test; test -e /run/builder-agent/builder-agent && echo mounted",
    )
    .await;
    assert_eq!(out, "built\nmounted\n");
    machine.poweroff().await.expect("poweroff");
    let mut output = Vec::new();
    run.wait(&mut output).await.expect("buildah run succeeds");
    drop(agents);
    let report = undo.unwind(Outcome::Success);
    assert!(report.is_clean(), "{:?}", report.warnings());

    // 4. A step whose host goes away fails the build, and buildah removes its container.
    let context2 = root.path().join("context2");
    fs_err::create_dir(&context2).expect("mkdir context");
    let mut agents = AgentDir::create(&context2.join(".builder"), 1).expect("agent dir");
    let mut connections = agents.connections().expect("listen");
    let failing = format!(
        "FROM {parent}\n{}\n",
        AgentDir::run_instruction(".builder", 1, "key-fails")
    );
    let (build, _) = start_build(&engine, &context2, &failing);
    let (_, stream) = tokio::time::timeout(Duration::from_secs(120), connections.recv())
        .await
        .expect("the RUN connects")
        .expect("a connection");
    let machine = Engine::agent_machine(stream, "failing step".into())
        .await
        .expect("hello");
    drop(machine);
    let mut output = Vec::new();
    let error = build.wait(&mut output).await.expect_err("the build fails");
    let text = format!("{error}");
    assert!(
        text.contains("ended before the run was over"),
        "the agent says why: {text}"
    );
    drop(agents);

    // 5. A dead builder's working container is recovered; a live one's is not.
    engine
        .run(&[
            "from",
            "--pull-never",
            "--name",
            "builder-999999.1-gone-abcd",
            parent,
        ])
        .await
        .expect("a container of a dead builder");
    let mut undo = UndoList::new(false, Leftovers::default());
    let mine = engine
        .from_image(parent, "alive", &mut undo)
        .await
        .expect("a container of this builder");
    let removed = engine.recover().await.expect("recover");
    assert_eq!(removed.len(), 1, "{removed:?}");
    assert!(
        removed[0].contains("builder-999999.1-gone-abcd"),
        "{removed:?}"
    );
    assert_eq!(engine.containers().await.expect("list"), vec![mine]);
    assert!(undo.unwind(Outcome::Success).is_clean());

    // Nothing left: no container, no container mount.
    assert_eq!(
        engine.containers().await.expect("list"),
        Vec::<String>::new()
    );
    let mounts: Vec<String> = container_tier::mounts_under(&dir)
        .into_iter()
        .filter(|m| m.ends_with("/merged"))
        .collect();
    assert!(mounts.is_empty(), "container mounts left: {mounts:?}");
    drop(engine);
}
