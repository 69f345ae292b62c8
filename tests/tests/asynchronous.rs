//! Asynchronous training (`[async]`, FedBuff) with real processes: a slow
//! node does not hold the server steps back, every applied step is the
//! staleness-weighted mean of the updates its nodes recorded sending, and a
//! client that is not our daemon gets a clear refusal for a stale update.

use std::collections::BTreeMap;

use fedge_tests::raw::{Upload, fetch, honest, join, numel, send, task};
use fedge_tests::*;

/// What a coordinator in asynchronous mode gets besides its data.
fn async_settings(steps: u32, k: u32) -> Vec<(&'static str, String)> {
    vec![
        ("rounds", steps.to_string()),
        ("async.enabled", "true".into()),
        ("async.buffer_size", k.to_string()),
        ("async.max_staleness", "20".into()),
        ("sampling.min_nodes", "1".into()),
        ("sampling.min_available", "4".into()),
        ("data.synthetic_test_samples", "200".into()),
        ("eval.threads", "1".into()),
        ("train.max_steps", "10".into()),
    ]
}

#[test]
fn a_slow_node_does_not_hold_the_steps_back_and_each_step_is_its_buffers_weighted_mean() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("run");
    let shared = [
        ("data.synthetic_seed", "5".to_string()),
        ("data.synthetic_train_samples", "1200".to_string()),
    ];
    let steps = 8u64;
    let record = |i: usize| tmp.path().join(format!("sent-{}", i + 1));
    // node-4 is ten times slower than the others.
    let history = run_fleet(tmp.path(), &out, 4, &shared, &async_settings(steps as u32, 2), |i| {
        let mut s = vec![("record_dir", format!("\"{}\"", record(i).display()))];
        if i == 3 {
            s.push(("train.slowdown", "10".into()));
        }
        s
    })?;
    assert_eq!(history["finished"], true);
    let rounds = history["rounds"].as_array().unwrap();
    assert_eq!(rounds.len() as u64, steps);
    // Each step's model exists from when it closed, in order.
    let started = history["started_unix_ms"].as_u64().unwrap();
    let closed: Vec<u64> = rounds.iter().map(|r| r["closed_unix_ms"].as_u64().unwrap()).collect();
    assert!(
        closed[0] >= started && closed.windows(2).all(|w| w[0] <= w[1]),
        "{closed:?}"
    );

    // The steps went on without the slow node: it is in at most one step's
    // buffer, while every step holds two updates.
    let with_slow = rounds.iter().filter(|r| participant(r, "node-4").is_some()).count();
    assert!(with_slow <= 1, "node-4 took part in {with_slow} of {steps} steps");
    let coordinator_log = std::fs::read_to_string(tmp.path().join("coordinator.log"))?;
    assert!(
        coordinator_log.contains("asynchronous training started") && coordinator_log.contains("step complete"),
        "{coordinator_log}"
    );

    // Each step's model is the previous one moved by the mean of exactly
    // the updates the nodes recorded sending, each weighted by its samples
    // and scaled by 1/sqrt(1 + staleness).
    for (r, step) in rounds.iter().enumerate() {
        let r = r as u64 + 1;
        assert_eq!(step["round"], r);
        let prev = load_params(&out.join(format!("rounds/round-{:04}.safetensors", r - 1)))?;
        let next = load_params(&out.join(format!("rounds/round-{r:04}.safetensors")))?;
        let participants = step["participants"].as_array().unwrap();
        assert_eq!(participants.len(), 2, "step {r}");
        let mut sum = vec![0f64; prev.values.len()];
        let mut weight = 0f64;
        let mut histogram = BTreeMap::new();
        for p in participants {
            let node: usize = p["node"].as_str().unwrap()["node-".len()..].parse()?;
            let task = p["task"].as_u64().unwrap();
            let base = p["base_version"].as_u64().unwrap();
            let staleness = p["staleness"].as_u64().unwrap();
            let factor = p["staleness_weight"].as_f64().unwrap();
            let w = p["weight"].as_f64().unwrap();
            assert!(
                base < r && staleness < r - base,
                "step {r}: base {base}, staleness {staleness}"
            );
            assert!((factor - (1.0 + staleness as f64).powf(-0.5)).abs() < 1e-12);
            *histogram.entry(staleness.to_string()).or_insert(0u64) += 1;
            let sent = load_params(&record(node - 1).join(format!("round-{task:04}.safetensors")))?;
            assert_eq!(meta_u64(&sent, "base_version"), base, "step {r}, task {task}");
            assert_eq!(meta_u64(&sent, "num_samples") as f64, w);
            for (s, d) in sum.iter_mut().zip(&sent.values) {
                *s += w * factor * f64::from(*d);
            }
            weight += w;
        }
        let recorded: BTreeMap<String, u64> = serde_json::from_value(step["staleness"].clone())?;
        assert_eq!(recorded, histogram, "step {r}");
        let worst = prev
            .values
            .iter()
            .zip(&next.values)
            .zip(&sum)
            .map(|((p, n), s)| {
                let expect = f64::from(*p) + s / weight;
                (f64::from(*n) - expect).abs() / expect.abs().max(1e-3)
            })
            .fold(0f64, f64::max);
        assert!(
            worst < 1e-5,
            "step {r}: the model is {worst} off the buffer's weighted mean"
        );
    }
    let accuracy = accuracies(&history);
    assert!(accuracy.last().unwrap() > &0.5, "the run learned little: {accuracy:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_update_is_refused_with_its_reason_and_the_node_gets_a_new_task() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let port = free_port();
    let out = tmp.path().join("run");
    let mut settings = async_settings(5, 1);
    settings.extend([
        ("async.max_staleness", "0".to_string()),
        ("sampling.min_available", "2".to_string()),
        ("data.synthetic_train_samples", "64".to_string()),
        ("strategy.max_loss_ratio", "0".to_string()),
    ]);
    let _coord = Daemon::start(
        "coordinator",
        "coordinator",
        &coordinator_args(port, &out, &settings),
        tmp.path(),
    )?;
    let mut a = join(port, "raw-a", 100).await?;
    let mut b = join(port, "raw-b", 100).await?;
    let (first, stale) = (task(&mut a).await?, task(&mut b).await?);
    assert_eq!((first.model_version, stale.model_version), (0, 0));
    let (manifest, _) = fetch(&mut a, 0).await?;
    let n = numel(&manifest);
    let upload = |session: &str, t: &fedge_common::pb::TrainTask| {
        Upload::new(session, t, &manifest, &honest(n, 1), 100).messages(1 << 20)
    };
    // a's update fills the buffer (K = 1): step 1 makes version 1, and a
    // gets its next task from it.
    send(&mut a.client, upload(&a.session, &first)).await?;
    let second = task(&mut a).await?;
    assert_eq!(second.model_version, 1);
    assert!(second.round > first.round);
    // Answering the first task again: that task is over.
    let again = send(&mut a.client, upload(&a.session, &first)).await.unwrap_err();
    assert_eq!(again.code(), tonic::Code::FailedPrecondition);
    assert!(
        again
            .message()
            .starts_with(&format!("node raw-a has no task {} in progress", first.round)),
        "{}",
        again.message()
    );
    // b trained from version 0, now one behind: above async.max_staleness = 0.
    let refusal = send(&mut b.client, upload(&b.session, &stale)).await.unwrap_err();
    assert_eq!(refusal.code(), tonic::Code::FailedPrecondition);
    assert_eq!(
        refusal.message(),
        "update computed against model version 0 is 1 versions behind the current version 1; this run \
         accepts updates at most 0 versions behind (async.max_staleness)"
    );
    // The refused task ends, and b gets a new one from version 1.
    let fresh = task(&mut b).await?;
    assert_eq!(fresh.model_version, 1);
    // A fetch waits while version 1 is being saved; a fetch of an older
    // version is then served the newest saved one.
    let (_, newest) = fetch(&mut a, 1).await?;
    let (_, older) = fetch(&mut a, 0).await?;
    assert_eq!(older, newest);
    // An update must start from the version its node was served.
    let mut wrong = Upload::new(&a.session, &second, &manifest, &honest(n, 1), 100);
    wrong.header.base_version = 0;
    let e = send(&mut a.client, wrong.messages(1 << 20)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert_eq!(
        e.message(),
        "update computed against model version 0; the current version is 1"
    );
    Ok(())
}

#[test]
fn a_coordinator_killed_mid_buffer_loses_no_step_and_takes_the_updates_trained_meanwhile() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("run");
    let port = free_port();
    let shared = [
        ("data.synthetic_seed", "5".to_string()),
        ("data.synthetic_train_samples", "900".to_string()),
    ];
    let mut settings = async_settings(10, 2);
    settings.push(("sampling.min_available", "3".into()));
    settings.extend(shared.iter().cloned());
    let args = coordinator_args(port, &out, &settings);
    let mut first = Daemon::start("coordinator", "coordinator-1", &args, tmp.path())?;
    // Each node's task takes a second or so: some are always training.
    let mut nodes = start_nodes(tmp.path(), port, 3, 3, |_| {
        let mut s = shared.to_vec();
        s.push(("train.slowdown", "4".into()));
        s
    })?;
    let saved = |out: &std::path::Path| -> usize {
        run_history(out)
            .ok()
            .and_then(|h| h["rounds"].as_array().map(Vec::len))
            .unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
    while saved(&out) < 3 {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no third step:\n{}",
            first.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // SIGKILL mid-buffer: the open buffer's updates and the nodes' sessions die with it.
    first.child.kill()?;
    first.child.wait()?;
    let before = saved(&out);
    let models: Vec<Vec<u8>> = (0..=before)
        .map(|k| std::fs::read(out.join(format!("rounds/round-{k:04}.safetensors"))))
        .collect::<Result<_, _>>()?;
    let mut second = Daemon::start("coordinator", "coordinator-2", &args, tmp.path())?;
    let status = second.wait(std::time::Duration::from_secs(240))?;
    assert!(status.success(), "{}", second.log_text());
    for n in &mut nodes {
        assert!(
            n.wait(std::time::Duration::from_secs(30))?.success(),
            "{}",
            n.log_text()
        );
    }

    let history = run_history(&out)?;
    assert_eq!(history["finished"], true);
    assert_eq!(history["resumed"], 1);
    let rounds = history["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 10);
    // Every step applied before the kill is there, unchanged.
    for (k, bytes) in models.iter().enumerate() {
        let now = std::fs::read(out.join(format!("rounds/round-{k:04}.safetensors")))?;
        assert!(now == *bytes, "step {k} changed across the restart");
    }
    // The updates the nodes trained while the coordinator was down were
    // sent again from their next session: taken, or refused for staleness.
    let logs: String = nodes.iter().map(Daemon::log_text).collect();
    let delivered = logs.matches("update from the last session delivered").count();
    let refused = logs.matches("update from the last session refused").count();
    assert!(delivered + refused >= 1, "no update crossed the restart:\n{logs}");
    let carried: Vec<u64> = rounds
        .iter()
        .flat_map(|r| r["participants"].as_array().unwrap().iter())
        .filter_map(|p| p["task"].as_u64())
        .filter(|&task| task < 1 << 32 && task > 0)
        .collect();
    let after_restart: usize = rounds[before..]
        .iter()
        .flat_map(|r| r["participants"].as_array().unwrap().iter())
        .filter(|p| p["task"].as_u64().is_some_and(|t| t < 1 << 32))
        .count();
    assert_eq!(after_restart, delivered, "{carried:?}");
    if delivered > 0 {
        assert!(
            second
                .log_text()
                .contains("update trained before the coordinator restarted accepted"),
            "{}",
            second.log_text()
        );
    }
    Ok(())
}
