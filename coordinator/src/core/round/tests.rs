//! Unit tests of the round machine, driven without sockets or threads
//! (`asynchronous`: those of asynchronous training).

use fedge_common::task::TrainMetrics;

use super::*;
use crate::core::secure::{SecAggInput, Step};
use crate::core::strategy::{Aggregator, ServerOpt, ServerOptimizer};

mod asynchronous;

fn settings(min_nodes: usize, fraction: f64) -> RoundSettings {
    RoundSettings {
        total_rounds: 2,
        fraction,
        min_nodes,
        min_available: min_nodes,
        deadline_ms: 1000,
        seed: 1,
        max_attempts: 0,
        failure_cooldown_rounds: 3,
        straggler_factor: 0.0,
        track_direction: false,
        federated_every: 1,
        train: TrainConfig::default(),
        secure: None,
        asynchronous: None,
    }
}

fn mean(numel: usize) -> Strategy {
    Strategy::new(
        Aggregator::Mean,
        ServerOptimizer::new(ServerOpt::Sgd, 1.0, numel),
        None,
        false,
        numel,
    )
}

fn machine(settings: RoundSettings, initial: Vec<f32>) -> RoundMachine {
    let n = initial.len();
    RoundMachine::new(settings, initial, mean(n))
}

fn update(round: u64, version: u64, delta: Vec<f32>, n: u64) -> Update {
    Update {
        round,
        base_version: version,
        num_samples: n,
        kind: UpdateKind::Delta,
        body: Body::dense(delta, None),
        metrics: TrainMetrics::default(),
        federated_eval: None,
        wire_bytes: 0,
        payload_bytes: 0,
        upload_seconds: 0.0,
    }
}

/// Submits `u` and runs the fold it causes as the driver would.
fn submit(m: &mut RoundMachine, session: &str, u: Update, now: u64) -> Result<(usize, Vec<Output>), Rejection> {
    let (n, out) = m.submit(session, u, now)?;
    let mut rest = Vec::new();
    for o in out {
        match o {
            Output::Fold(job) => rest.extend(m.folded(job.run(), now)),
            other => rest.push(other),
        }
    }
    Ok((n, rest))
}

/// Runs the aggregation job in `out` and returns the round it closes.
fn closed_round(m: &mut RoundMachine, out: Vec<Output>, now: u64) -> ClosedRound {
    match settle(m, out, now).as_slice() {
        [Output::Close(closed)] => closed.clone(),
        other => panic!("expected a close, got {other:?}"),
    }
}

/// Runs any aggregation job in `out` as the driver would.
fn settle(m: &mut RoundMachine, out: Vec<Output>, now: u64) -> Vec<Output> {
    let mut result = Vec::new();
    for o in out {
        match o {
            Output::Aggregate(job) => result.extend(m.aggregated(job.run(), now)),
            other => result.push(other),
        }
    }
    result
}

fn assigned(out: &[Output]) -> Vec<String> {
    let mut v: Vec<String> = out
        .iter()
        .filter_map(|o| match o {
            Output::Assign { node, .. } => Some(node.clone()),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

/// Joins and connects nodes `a`, `b`, `c`; returns the outputs of the last connect.
fn fleet(m: &mut RoundMachine) -> Vec<Output> {
    let mut last = Vec::new();
    for n in ["a", "b", "c"] {
        m.join(n, &format!("s-{n}"), 1000, None, 0).unwrap();
        last = m.connect(&format!("s-{n}"), 0).unwrap();
    }
    last
}

#[test]
fn a_round_starts_when_enough_nodes_connect_and_closes_at_quorum() {
    let mut m = machine(settings(3, 1.0), vec![0.0, 0.0]);
    let out = fleet(&mut m);
    assert_eq!(assigned(&out), ["a", "b", "c"]);
    assert_eq!(m.current_round(), Some(1));

    let (n, out) = submit(&mut m, "s-a", update(1, 0, vec![1.0, 2.0], 10), 5).unwrap();
    assert_eq!((n, out.len()), (1, 0));
    submit(&mut m, "s-b", update(1, 0, vec![3.0, 2.0], 30), 6).unwrap();
    let (_, out) = submit(&mut m, "s-c", update(1, 0, vec![0.0, 2.0], 60), 7).unwrap();
    assert!(matches!(out.as_slice(), [Output::Aggregate(_)]));
    assert_eq!(m.phase(), PhaseKind::Aggregating);
    let closed = closed_round(&mut m, out, 7);
    // (1*10 + 3*30 + 0*60) / 100 = 1.0; 2.0 everywhere.
    assert_eq!(*closed.global, vec![1.0, 2.0]);
    assert_eq!((closed.round, closed.version, closed.contributions.len()), (1, 1, 3));
    assert_eq!(m.phase(), PhaseKind::Closing);

    let out = m.persisted(8);
    assert_eq!(assigned(&out), ["a", "b", "c"]);
    assert_eq!(m.current_round(), Some(2));
}

#[test]
fn node_views_follow_each_node_through_a_round() {
    let mut m = machine(settings(3, 1.0), vec![0.0]);
    fleet(&mut m);
    let states = |m: &RoundMachine| -> Vec<(String, &'static str)> {
        m.node_views().into_iter().map(|v| (v.name, v.state)).collect()
    };
    assert_eq!(
        states(&m),
        [
            ("a".into(), "training"),
            ("b".into(), "training"),
            ("c".into(), "training")
        ]
    );
    submit(&mut m, "s-a", update(1, 0, vec![1.0], 10), 42).unwrap();
    m.disconnect("s-c", 43);
    assert_eq!(
        states(&m),
        [
            ("a".into(), "delivered"),
            ("b".into(), "training"),
            ("c".into(), "offline")
        ]
    );
    let a = &m.node_views()[0];
    assert_eq!(
        (a.rounds_contributed, a.num_samples, a.last_seen_ms, a.connected),
        (1, 1000, 42, true)
    );
    assert_eq!(m.node_views()[2].last_seen_ms, 43);
}

#[test]
fn the_last_persisted_round_finishes_the_run() {
    let mut m = machine(
        RoundSettings {
            min_available: 3,
            ..settings(1, 1.0)
        },
        vec![0.0],
    );
    fleet(&mut m);
    for round in 1..=2 {
        for n in ["a", "b", "c"] {
            let (_, out) = submit(&mut m, &format!("s-{n}"), update(round, round - 1, vec![1.0], 1), 0).unwrap();
            settle(&mut m, out, 0);
        }
        let out = m.persisted(0);
        if round == 2 {
            assert!(matches!(out.as_slice(), [Output::Finished]));
        }
    }
    assert_eq!(**m.global().in_memory().unwrap(), vec![2.0]);
    assert_eq!(m.phase(), PhaseKind::Finished);
}

#[test]
fn bad_updates_are_refused_and_change_nothing() {
    let mut m = machine(settings(3, 1.0), vec![0.0, 0.0]);
    fleet(&mut m);
    let refused = |m: &mut RoundMachine, s: &str, u: Update| submit(m, s, u, 0).unwrap_err();
    assert_eq!(
        refused(&mut m, "nobody", update(1, 0, vec![0.0; 2], 1)),
        Rejection::UnknownSession
    );
    let e = refused(&mut m, "s-a", update(0, 0, vec![0.0; 2], 1));
    assert_eq!(e.to_string(), "late update for round 0; round 1 is in progress");
    let e = refused(&mut m, "s-a", update(1, 3, vec![0.0; 2], 1));
    assert_eq!(
        e.to_string(),
        "update computed against model version 3; the current version is 0"
    );
    let e = refused(&mut m, "s-a", update(1, 0, vec![0.0; 3], 1));
    assert_eq!(e.to_string(), "update has 3 values; the model has 2");
    let e = refused(&mut m, "s-a", update(1, 0, vec![0.0, f32::NAN], 1));
    assert_eq!(e.to_string(), "update value 1 is not finite");
    let e = refused(&mut m, "s-a", update(1, 0, vec![0.0; 2], 0));
    assert_eq!(e.to_string(), "update claims zero training samples");
    submit(&mut m, "s-a", update(1, 0, vec![1.0; 2], 1), 0).unwrap();
    let e = refused(&mut m, "s-a", update(1, 0, vec![1.0; 2], 1));
    assert_eq!(e.to_string(), "node a already contributed to round 1");
    submit(&mut m, "s-b", update(1, 0, vec![1.0; 2], 1), 0).unwrap();
    let (_, out) = submit(&mut m, "s-c", update(1, 0, vec![1.0; 2], 1), 0).unwrap();
    let closed = closed_round(&mut m, out, 0);
    assert_eq!(*closed.global, vec![1.0, 1.0]);
}

#[test]
fn sampling_takes_a_fraction_with_a_minimum_and_is_reproducible() {
    let run = || {
        let mut m = machine(
            RoundSettings {
                min_available: 6,
                ..settings(2, 0.3)
            },
            vec![0.0],
        );
        let mut out = Vec::new();
        for i in 0..6 {
            let n = format!("n{i}");
            m.join(&n, &n, 5, None, 0).unwrap();
            out = m.connect(&n, 0).unwrap();
        }
        assigned(&out)
    };
    let first = run();
    assert_eq!(first.len(), 2); // ceil(0.3 * 6) = 2
    assert_eq!(first, run());
}

#[test]
fn deadline_closes_with_the_minimum_or_retries() {
    let mut m = machine(
        RoundSettings {
            min_available: 3,
            ..settings(2, 1.0)
        },
        vec![0.0],
    );
    fleet(&mut m);
    submit(&mut m, "s-a", update(1, 0, vec![1.0], 1), 10).unwrap();
    // One update, minimum two: the deadline retries the round.
    let out = m.tick(1000);
    assert_eq!(assigned(&out).len(), 3);
    assert_eq!(m.current_round(), Some(1));
    // The retry's deadline is measured from the retry.
    assert!(m.tick(1500).is_empty());
    submit(&mut m, "s-a", update(1, 0, vec![1.0], 1), 1600).unwrap();
    submit(&mut m, "s-b", update(1, 0, vec![3.0], 1), 1700).unwrap();
    let out = m.tick(2000);
    let closed = closed_round(&mut m, out, 2000);
    assert_eq!(*closed.global, vec![2.0]);
    assert_eq!(closed.contributions.len(), 2);
}

#[test]
fn a_node_that_leaves_costs_only_its_contribution() {
    let mut m = machine(
        RoundSettings {
            min_available: 3,
            ..settings(2, 1.0)
        },
        vec![0.0],
    );
    fleet(&mut m);
    submit(&mut m, "s-a", update(1, 0, vec![1.0], 1), 0).unwrap();
    submit(&mut m, "s-b", update(1, 0, vec![3.0], 1), 0).unwrap();
    let out = m.disconnect("s-c", 5);
    let closed = closed_round(&mut m, out, 5);
    assert_eq!(*closed.global, vec![2.0]);
}

#[test]
fn a_rejoining_node_is_handed_the_current_task() {
    let mut m = machine(settings(3, 1.0), vec![0.0]);
    fleet(&mut m);
    assert!(m.disconnect("s-b", 1).is_empty() || m.phase() == PhaseKind::Training);
    m.join("b", "s-b2", 10, None, 0).unwrap();
    assert_eq!(
        submit(&mut m, "s-b", update(1, 0, vec![1.0], 1), 2).unwrap_err(),
        Rejection::UnknownSession
    );
    let out = m.connect("s-b2", 2).unwrap();
    assert_eq!(assigned(&out), ["b"]);
}

#[test]
fn a_connected_name_cannot_be_taken_by_another_session() {
    let mut m = machine(settings(3, 1.0), vec![0.0]);
    fleet(&mut m);
    let e = m.join("a", "s-intruder", 10, None, 0).unwrap_err();
    assert_eq!(e, Rejection::NameInUse { node: "a".into() });
    assert!(
        e.to_string()
            .starts_with("node a is already connected in another session")
    );
    assert_eq!(m.join("a", "s-x", 10, Some("s-wrong"), 0).unwrap_err(), e);
    // The node itself, presenting its session, rejoins at once.
    m.join("a", "s-a2", 10, Some("s-a"), 0).unwrap();
    assert_eq!(m.session_of("a"), Some("s-a2"));
    // Once the old connection is gone, any process may take the name.
    m.disconnect("s-b", 1);
    m.join("b", "s-b2", 10, None, 0).unwrap();
}

fn four(m: &mut RoundMachine) -> Vec<Output> {
    let mut last = Vec::new();
    for n in ["w", "x", "y", "z"] {
        m.join(n, &format!("s-{n}"), 10, None, 0).unwrap();
        last = m.connect(&format!("s-{n}"), 0).unwrap();
    }
    last
}

#[test]
fn a_node_that_failed_recently_is_picked_last() {
    for seed in 0..20 {
        let mut m = machine(
            RoundSettings {
                seed,
                min_available: 4,
                total_rounds: 5,
                ..settings(1, 0.5)
            },
            vec![0.0],
        );
        let picked = assigned(&four(&mut m));
        assert_eq!(picked.len(), 2);
        // The first delivers, the second stays silent past the deadline.
        let (good, bad) = (&picked[0], &picked[1]);
        submit(&mut m, &format!("s-{good}"), update(1, 0, vec![1.0], 1), 10).unwrap();
        let out = m.tick(1000);
        settle(&mut m, out, 1000);
        let next = assigned(&m.persisted(1001));
        assert_eq!(next.len(), 2);
        assert!(
            !next.contains(bad),
            "seed {seed}: {bad} failed in round 1 yet was picked: {next:?}"
        );
    }
}

#[test]
fn fedsgd_gradients_become_steps_of_the_rounds_learning_rate() {
    let mut s = settings(3, 1.0);
    s.train.algorithm = Algorithm::FedSgd;
    s.train.learning_rate = 0.1;
    let mut m = machine(s, vec![1.0, 1.0]);
    let out = fleet(&mut m);
    let Output::Assign { task, .. } = &out[0] else { panic!() };
    assert_eq!(task.hyper.algorithm, Algorithm::FedSgd);
    let e = submit(&mut m, "s-a", update(1, 0, vec![1.0, 1.0], 1), 0).unwrap_err();
    assert_eq!(
        e.to_string(),
        "this run's algorithm expects a gradient; the update carries a model delta"
    );
    let grad = |g: Vec<f32>| Update {
        kind: UpdateKind::Gradient,
        ..update(1, 0, g, 1)
    };
    submit(&mut m, "s-a", grad(vec![1.0, -2.0]), 0).unwrap();
    submit(&mut m, "s-b", grad(vec![1.0, -2.0]), 0).unwrap();
    let (_, out) = submit(&mut m, "s-c", grad(vec![1.0, -2.0]), 0).unwrap();
    let closed = closed_round(&mut m, out, 0);
    assert!((closed.global[0] - 0.9).abs() < 1e-6 && (closed.global[1] - 1.2).abs() < 1e-6);
}

#[test]
fn scaffold_updates_carry_control_deltas_that_move_the_server_control() {
    let mut s = settings(2, 1.0);
    s.train.algorithm = Algorithm::Scaffold;
    s.min_available = 3;
    let strategy = Strategy::new(
        Aggregator::Mean,
        ServerOptimizer::new(ServerOpt::Sgd, 1.0, 2),
        None,
        true,
        2,
    );
    let mut m = RoundMachine::new(s, vec![0.0, 0.0], strategy);
    fleet(&mut m);
    let e = submit(&mut m, "s-a", update(1, 0, vec![1.0, 1.0], 1), 0).unwrap_err();
    assert_eq!(
        e.to_string(),
        "this run's algorithm expects a model delta with a control-variate delta; the update carries a model delta"
    );
    let with = |c: Vec<f32>| Update {
        body: Body::dense(vec![1.0, 1.0], Some(c)),
        ..update(1, 0, vec![1.0, 1.0], 1)
    };
    let e = submit(&mut m, "s-a", with(vec![1.0]), 0).unwrap_err();
    assert_eq!(e.to_string(), "update has 1 values; the model has 2");
    submit(&mut m, "s-a", with(vec![3.0, 0.0]), 0).unwrap();
    submit(&mut m, "s-b", with(vec![3.0, 6.0]), 0).unwrap();
    // Node c leaves: two of three nodes took part, c += (2/3)·mean = sum/3.
    let out = m.disconnect("s-c", 1);
    let closed = closed_round(&mut m, out, 1);
    assert_eq!(closed.control.as_deref().map(Vec::as_slice), Some(&[2.0f32, 2.0][..]));
    assert_eq!(m.control(), Some(&[2.0f32, 2.0][..]));
    assert!(closed.strategy_state.0.contains_key("scaffold.c"));
}

#[test]
fn updates_above_the_norm_bound_are_scaled_down() {
    let strategy = Strategy::new(
        Aggregator::Mean,
        ServerOptimizer::new(ServerOpt::Sgd, 1.0, 2),
        Some(1.0),
        false,
        2,
    );
    let mut m = RoundMachine::new(settings(3, 1.0), vec![0.0, 0.0], strategy);
    fleet(&mut m);
    submit(&mut m, "s-a", update(1, 0, vec![30.0, 40.0], 1), 0).unwrap();
    submit(&mut m, "s-b", update(1, 0, vec![0.3, 0.4], 1), 0).unwrap();
    let (_, out) = submit(&mut m, "s-c", update(1, 0, vec![0.3, 0.4], 1), 0).unwrap();
    let closed = closed_round(&mut m, out, 0);
    // mean of [0.6, 0.8], [0.3, 0.4], [0.3, 0.4]
    assert!((closed.global[0] - 0.4).abs() < 1e-6 && (closed.global[1] - 1.6 / 3.0).abs() < 1e-6);
    let a = &closed.contributions[0];
    assert!(a.clipped && (a.update_norm - 50.0).abs() < 1e-9);
    assert!(!closed.contributions[1].clipped);
}

fn private(noise: crate::config::NoiseMode, budget: f64) -> Strategy {
    let mut s = mean(2);
    s.privacy = crate::config::PrivacyConfig {
        noise,
        noise_multiplier: 1e-3,
        clip_norm: 1.0,
        epsilon_budget: budget,
        ..Default::default()
    }
    .privacy();
    s
}

#[test]
fn central_privacy_clips_weighs_equally_and_accounts_each_round() {
    let mut m = RoundMachine::new(
        settings(3, 1.0),
        vec![0.0, 0.0],
        private(crate::config::NoiseMode::Central, 0.0),
    );
    let out = fleet(&mut m);
    // Central noise: nodes send their updates as they are.
    for o in &out {
        if let Output::Assign { task, .. } = o {
            assert_eq!(task.hyper.privacy, None);
        }
    }
    // Sample counts do not weigh; the coordinator clips to 1.
    submit(&mut m, "s-a", update(1, 0, vec![30.0, 40.0], 1000), 0).unwrap();
    submit(&mut m, "s-b", update(1, 0, vec![0.3, 0.4], 1), 0).unwrap();
    let (_, out) = submit(&mut m, "s-c", update(1, 0, vec![0.3, 0.4], 1), 0).unwrap();
    let closed = closed_round(&mut m, out, 0);
    // mean of [0.6, 0.8], [0.3, 0.4], [0.3, 0.4], plus noise of 1e-3/3
    assert!((closed.global[0] - 0.4).abs() < 3e-3 && (closed.global[1] - 1.6 / 3.0).abs() < 3e-3);
    let p = closed.privacy.expect("the round's privacy record");
    assert_eq!((p.updates, p.unclipped, p.sampling_rate, p.clip_norm), (3, 2, 1.0, 1.0));
    assert!(p.epsilon > 0.0 && p.epsilon.is_finite());
    assert!(closed.contributions[0].clipped);
}

#[test]
fn distributed_privacy_tells_nodes_their_share_and_the_budget_ends_the_run() {
    let mut m = RoundMachine::new(
        settings(3, 1.0),
        vec![0.0, 0.0],
        private(crate::config::NoiseMode::Distributed, 1e9),
    );
    let out = fleet(&mut m);
    let tasks: Vec<_> = out
        .iter()
        .filter_map(|o| match o {
            Output::Assign { task, .. } => task.hyper.privacy,
            _ => None,
        })
        .collect();
    assert_eq!(tasks.len(), 3);
    assert!((tasks[0].noise_stddev - 1e-3 / 3f64.sqrt()).abs() < 1e-15 && tasks[0].clip_norm == 1.0);
    // The coordinator leaves distributed updates alone (nodes clipped them) and counts
    // the ones their nodes say needed no clipping.
    let mut fits = update(1, 0, vec![3.0, 4.0], 1);
    fits.metrics.unclipped = Some(true);
    submit(&mut m, "s-a", fits, 0).unwrap();
    submit(&mut m, "s-b", update(1, 0, vec![0.0, 0.0], 1), 0).unwrap();
    let (_, out) = submit(&mut m, "s-c", update(1, 0, vec![0.0, 0.0], 1), 0).unwrap();
    let closed = closed_round(&mut m, out, 0);
    assert!((closed.global[0] - 1.0).abs() < 1e-6 && (closed.global[1] - 4.0 / 3.0).abs() < 1e-6);
    assert_eq!(closed.privacy.as_ref().map(|p| p.unclipped), Some(1));
    // A budget the next round would pass finishes the run after round 1.
    let mut m = RoundMachine::new(
        settings(3, 1.0),
        vec![0.0, 0.0],
        private(crate::config::NoiseMode::Central, 1e9),
    );
    fleet(&mut m);
    for s in ["s-a", "s-b"] {
        submit(&mut m, s, update(1, 0, vec![0.0, 0.0], 1), 0).unwrap();
    }
    let (_, out) = submit(&mut m, "s-c", update(1, 0, vec![0.0, 0.0], 1), 0).unwrap();
    let closed = closed_round(&mut m, out, 0);
    let spent = closed.privacy.unwrap().epsilon;
    if let Some(s) = m.strategy.as_mut().and_then(|s| s.privacy.as_mut()) {
        s.budget = Some(spent * 1.5);
    }
    assert!(matches!(m.persisted(0).as_slice(), [Output::Finished]));
    assert_eq!(m.phase(), PhaseKind::Finished);
    assert!(m.stop_reason().unwrap().contains("the privacy budget is spent"));
}

#[test]
fn an_aggregator_that_cannot_apply_retries_the_round() {
    let strategy = Strategy::new(
        Aggregator::Krum { f: 1 },
        ServerOptimizer::new(ServerOpt::Sgd, 1.0, 1),
        None,
        false,
        1,
    );
    let mut m = RoundMachine::new(settings(3, 1.0), vec![0.0], strategy);
    fleet(&mut m);
    for n in ["a", "b"] {
        submit(&mut m, &format!("s-{n}"), update(1, 0, vec![1.0], 1), 0).unwrap();
    }
    let (_, out) = submit(&mut m, "s-c", update(1, 0, vec![1.0], 1), 0).unwrap();
    let out = settle(&mut m, out, 0);
    // Krum with f = 1 needs 5 updates: the round starts again.
    assert_eq!(assigned(&out), ["a", "b", "c"]);
    assert_eq!((m.current_round(), m.version()), (Some(1), 0));
}

/// Joins and connects `nodes` (name, declared samples).
fn cohort(m: &mut RoundMachine, nodes: &[(&str, u64)]) -> Vec<Output> {
    let mut last = Vec::new();
    for (n, samples) in nodes {
        m.join(n, &format!("s-{n}"), *samples, None, 0).unwrap();
        last = m.connect(&format!("s-{n}"), 0).unwrap();
    }
    last
}

fn capped(numel: usize, factor: f64) -> Strategy {
    let mut s = mean(numel);
    s.weighting.max_factor = Some(factor);
    s
}

#[test]
fn a_node_weighs_at_most_what_it_declared_and_the_cohorts_cap() {
    let mut m = RoundMachine::new(settings(3, 1.0), vec![0.0], capped(1, 4.0));
    cohort(&mut m, &[("a", 100), ("b", 100), ("c", u64::MAX)]);
    // An update may not claim more than its node declared.
    let e = submit(&mut m, "s-a", update(1, 0, vec![1.0], 101), 0).unwrap_err();
    assert_eq!(
        e,
        Rejection::TooManySamples {
            claimed: 101,
            declared: 100
        }
    );
    assert_eq!(
        e.to_string(),
        "update claims 101 training samples; the node declared 100 when it joined"
    );
    assert!(e.is_content());
    submit(&mut m, "s-a", update(1, 0, vec![3.0], 100), 0).unwrap();
    submit(&mut m, "s-b", update(1, 0, vec![3.0], 100), 0).unwrap();
    // c claims 2^64 - 1 samples with a zero update: it weighs 4 x 100.
    let (_, out) = submit(&mut m, "s-c", update(1, 0, vec![0.0], u64::MAX), 0).unwrap();
    let closed = closed_round(&mut m, out, 0);
    assert_eq!(*closed.global, vec![1.0], "(3 x 100 + 3 x 100 + 0 x 400) / 600");
}

fn norm_bounded(initial: Vec<f32>) -> RoundMachine {
    let mut s = mean(2);
    s.max_norm_factor = Some(10.0);
    RoundMachine::new(settings(3, 1.0), initial, s)
}

/// Runs round 1 with updates `[0, d]` for d in `deltas`.
fn bounded_round_one(m: &mut RoundMachine, deltas: [f32; 3]) {
    fleet(m);
    for (n, d) in ["a", "b", "c"].iter().zip(deltas) {
        let (_, out) = submit(m, &format!("s-{n}"), update(1, 0, vec![0.0, d], 1), 0).unwrap();
        if *n == "c" {
            closed_round(m, out, 0);
        }
    }
    m.persisted(0);
}

#[test]
fn updates_far_beyond_the_runs_norm_are_refused() {
    let mut m = norm_bounded(vec![3.0, 4.0]);
    fleet(&mut m);
    // Before any round completes: at most 10 x the model's norm (5).
    let e = submit(&mut m, "s-a", update(1, 0, vec![-60.0, -80.0], 1), 0).unwrap_err();
    assert!(
        matches!(&e, Rejection::NormOutlier { norm, bound, .. } if *norm == 100.0 && *bound == 50.0),
        "{e:?}"
    );
    assert!(
        e.to_string()
            .contains("10 times 5.0000e0, the norm of the global model"),
        "{e}"
    );
    assert!(e.is_content());
    submit(&mut m, "s-b", update(1, 0, vec![-30.0, -39.0], 1), 0).unwrap();

    // Round 1's updates are small (median 0.2) next to the model (norm
    // about 5.1): an honest update that grows 20x in round 2 still fits
    // under 10 x the model's norm, and a 1e30 one does not.
    let mut m = norm_bounded(vec![3.0, 4.0]);
    bounded_round_one(&mut m, [0.1, 0.2, 0.3]);
    submit(&mut m, "s-a", update(2, 1, vec![0.0, 4.0], 1), 0).unwrap();
    let e = submit(&mut m, "s-b", update(2, 1, vec![1e30, 1e30], 1), 0).unwrap_err();
    assert!(e.to_string().contains("the norm of the global model"), "{e}");

    // Updates larger than the model (median 0.2 against a model of norm
    // about 0.16): the bound follows the median.
    let mut m = norm_bounded(vec![0.03, 0.04]);
    bounded_round_one(&mut m, [-0.1, -0.2, -0.3]);
    let e = submit(&mut m, "s-a", update(2, 1, vec![0.0, 2.5], 1), 0).unwrap_err();
    match &e {
        Rejection::NormOutlier { norm, bound, .. } => {
            assert_eq!(*norm, 2.5);
            assert!((bound - 2.0).abs() < 1e-6, "{bound}");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        e.to_string()
            .contains("the median norm of the last completed round's updates"),
        "{e}"
    );
    submit(&mut m, "s-b", update(2, 1, vec![0.0, 1.9], 1), 0).unwrap();
}

#[test]
fn a_non_finite_new_model_retries_the_round() {
    let mut m = machine(settings(3, 1.0), vec![3e38]);
    fleet(&mut m);
    submit(&mut m, "s-a", update(1, 0, vec![3e38], 1), 0).unwrap();
    submit(&mut m, "s-b", update(1, 0, vec![3e38], 1), 0).unwrap();
    let (_, out) = submit(&mut m, "s-c", update(1, 0, vec![3e38], 1), 0).unwrap();
    let Some(Output::Aggregate(job)) = out.into_iter().next() else {
        panic!("expected an aggregation")
    };
    // 3e38 + 3e38 is infinite in f32: nothing is committed; the round starts again.
    let done = job.run();
    assert_eq!(
        done.result.as_ref().err(),
        Some(&AggregationFailure::NonFiniteModel { index: 0 })
    );
    assert_eq!(
        done.result.as_ref().unwrap_err().to_string(),
        "the new global model has a non-finite value at index 0"
    );
    let out = m.aggregated(done, 0);
    assert_eq!(assigned(&out), ["a", "b", "c"]);
    assert_eq!((m.current_round(), m.version()), (Some(1), 0));
    assert_eq!(m.global().in_memory().map(|g| g[0]), Some(3e38));
}

#[test]
fn a_refusal_counts_only_for_the_round_its_stream_was_for() {
    let mut m = machine(
        RoundSettings {
            min_available: 3,
            // c is asked again in round 2 (refused and still connected,
            // it would sit a cool-down out).
            failure_cooldown_rounds: 0,
            ..settings(2, 1.0)
        },
        vec![0.0],
    );
    fleet(&mut m);
    for n in ["a", "b"] {
        submit(&mut m, &format!("s-{n}"), update(1, 0, vec![1.0], 1), 0).unwrap();
    }
    // c's round-1 stream broke: round 1 closes without it.
    let out = m.refuse("s-c", 1, 0);
    closed_round(&mut m, out, 0);
    m.persisted(0);
    assert_eq!(m.current_round(), Some(2));
    // A round-1 stream of c's that times out during round 2 changes nothing:
    // round 2 still waits for c's round-2 update.
    for n in ["a", "b"] {
        submit(&mut m, &format!("s-{n}"), update(2, 1, vec![1.0], 1), 0).unwrap();
    }
    assert!(m.refuse("s-c", 1, 0).is_empty());
    assert_eq!(m.phase(), PhaseKind::Training);
    let (_, out) = submit(&mut m, "s-c", update(2, 1, vec![1.0], 1), 0).unwrap();
    assert_eq!(closed_round(&mut m, out, 0).contributions.len(), 3);
}

#[test]
fn only_nodes_training_in_the_round_fetch_the_model() {
    let mut m = machine(
        RoundSettings {
            min_available: 3,
            ..settings(2, 1.0)
        },
        vec![0.0],
    );
    m.join("early", "s-early", 1, None, 0).unwrap();
    // Joined, no round yet: no task, no fetch.
    let e = m.admit_fetch("s-early", 0).unwrap_err();
    assert_eq!(
        e.to_string(),
        "node early has no task for model version 0; only nodes training in the round in progress fetch the model"
    );
    assert_eq!(m.admit_fetch("s-nobody", 0).unwrap_err(), Rejection::UnknownSession);
    fleet(&mut m);
    assert_eq!(m.admit_fetch("s-a", 0).unwrap(), "a");
    assert!(matches!(m.admit_fetch("s-a", 1), Err(Rejection::NoTask { .. })));
    submit(&mut m, "s-a", update(1, 0, vec![1.0], 1), 0).unwrap();
    // Delivered: nothing left to fetch for.
    assert!(matches!(m.admit_fetch("s-a", 0), Err(Rejection::NoTask { .. })));
}

#[test]
fn a_round_closes_without_stragglers_after_the_set_factor() {
    let mut m = machine(
        RoundSettings {
            straggler_factor: 3.0,
            min_available: 4,
            deadline_ms: 600_000,
            ..settings(2, 1.0)
        },
        vec![0.0],
    );
    for n in ["a", "b", "c", "d"] {
        m.join(n, &format!("s-{n}"), 10, None, 0).unwrap();
        m.connect(&format!("s-{n}"), 0).unwrap();
    }
    // Half of four delivered after 10 s: the rest get 20 s more.
    submit(&mut m, "s-a", update(1, 0, vec![1.0], 1), 5_000).unwrap();
    submit(&mut m, "s-b", update(1, 0, vec![3.0], 1), 10_000).unwrap();
    assert!(m.tick(29_999).is_empty());
    submit(&mut m, "s-c", update(1, 0, vec![5.0], 1), 20_000).unwrap();
    let out = m.tick(30_000);
    let closed = closed_round(&mut m, out, 30_000);
    assert_eq!(closed.contributions.len(), 3, "d is left out");
    assert_eq!(*closed.global, vec![3.0]);
}

#[test]
fn a_node_cut_while_connected_sits_out_its_cool_down_and_one_that_left_is_picked_last() {
    for d_returns in [true, false] {
        let mut m = machine(
            RoundSettings {
                straggler_factor: 3.0,
                min_available: 4,
                deadline_ms: 600_000,
                total_rounds: 3,
                ..settings(2, 1.0)
            },
            vec![0.0],
        );
        for n in ["e", "d", "a", "b", "c"] {
            m.join(n, &format!("s-{n}"), 10, None, 0).unwrap();
            m.connect(&format!("s-{n}"), 0).unwrap();
        }
        // Round 1 asks the first four; d leaves, e stays and sends nothing.
        m.disconnect("s-d", 1_000);
        for n in ["a", "b"] {
            submit(&mut m, &format!("s-{n}"), update(1, 0, vec![1.0], 1), 10_000).unwrap();
        }
        if d_returns {
            m.join("d", "s-d2", 10, None, 12_000).unwrap();
            m.connect("s-d2", 12_000).unwrap();
        }
        let out = m.tick(30_000);
        closed_round(&mut m, out, 30_000);
        let next = assigned(&m.persisted(30_001));
        if d_returns {
            assert_eq!(next, ["a", "b", "c", "d"], "e sits round 2 out; d is picked (last)");
        } else {
            assert_eq!(next, ["a", "b", "c"], "e sits round 2 out although four are wanted");
        }
    }
    // With fewer than min_nodes others, a node that held back is picked last.
    for c_connected in [true, false] {
        let mut m = machine(
            RoundSettings {
                deadline_ms: 600_000,
                ..settings(3, 1.0)
            },
            vec![0.0],
        );
        for n in ["e", "a", "b", "c"] {
            m.join(n, &format!("s-{n}"), 10, None, 0).unwrap();
            if n != "c" || c_connected {
                m.connect(&format!("s-{n}"), 0).unwrap();
            }
        }
        for n in ["a", "b"] {
            submit(&mut m, &format!("s-{n}"), update(1, 0, vec![1.0], 1), 10_000).unwrap();
        }
        // Two of three at the deadline: the round is retried.
        let retry = assigned(&m.tick(600_000));
        let expected: &[&str] = if c_connected {
            &["a", "b", "c"]
        } else {
            &["a", "b", "e"]
        };
        assert_eq!(retry, expected, "c connected: {c_connected}");
    }
}

#[test]
fn a_node_that_restarts_mid_round_is_picked_last_not_left_out() {
    let mut m = machine(
        RoundSettings {
            straggler_factor: 3.0,
            min_available: 3,
            deadline_ms: 600_000,
            total_rounds: 2,
            ..settings(2, 1.0)
        },
        vec![0.0],
    );
    for n in ["e", "a", "b"] {
        m.join(n, &format!("s-{n}"), 10, None, 0).unwrap();
        m.connect(&format!("s-{n}"), 0).unwrap();
    }
    // e's process restarts and resumes under a new session before its
    // old stream's end is seen; it does not deliver round 1.
    m.join("e", "s-e2", 10, Some("s-e"), 2_000).unwrap();
    m.connect("s-e2", 2_000).unwrap();
    for n in ["a", "b"] {
        submit(&mut m, &format!("s-{n}"), update(1, 0, vec![1.0], 1), 10_000).unwrap();
    }
    let out = m.tick(30_000);
    closed_round(&mut m, out, 30_000);
    assert_eq!(assigned(&m.persisted(30_001)), ["a", "b", "e"]);
}

#[test]
fn a_node_cut_a_third_time_sits_out_twice_as_long() {
    let mut m = machine(
        RoundSettings {
            straggler_factor: 3.0,
            min_available: 3,
            deadline_ms: 600_000,
            total_rounds: 9,
            failure_cooldown_rounds: 1,
            ..settings(2, 1.0)
        },
        vec![0.0],
    );
    let mut out = Vec::new();
    for n in ["e", "a", "b"] {
        m.join(n, &format!("s-{n}"), 10, None, 0).unwrap();
        out = m.connect(&format!("s-{n}"), 0).unwrap();
    }
    let (mut with_e, mut start) = (Vec::new(), 0);
    for round in 1..=9u64 {
        let e_asked = assigned(&out).contains(&"e".to_string());
        submit(&mut m, "s-a", update(round, round - 1, vec![1.0], 1), start + 5_000).unwrap();
        let (_, last) = submit(&mut m, "s-b", update(round, round - 1, vec![1.0], 1), start + 10_000).unwrap();
        // e holds its update back: the round closes at the cutoff.
        let closing = if e_asked {
            with_e.push(round);
            m.tick(start + 30_000)
        } else {
            last
        };
        closed_round(&mut m, closing, start + 30_000);
        start += 30_001;
        out = m.persisted(start);
    }
    // Cut in rounds 1 and 3: out for 1 round each; again in 5: out for
    // 2; again in 8.
    assert_eq!(with_e, [1, 3, 5, 8]);
}

#[test]
fn a_rejected_model_retries_the_round_without_the_update_that_weighed_most() {
    let mut m = machine(
        RoundSettings {
            min_available: 3,
            ..settings(2, 1.0)
        },
        vec![0.0],
    );
    fleet(&mut m);
    submit(&mut m, "s-a", update(1, 0, vec![0.1], 10), 0).unwrap();
    submit(&mut m, "s-b", update(1, 0, vec![0.2], 10), 0).unwrap();
    let (_, out) = submit(&mut m, "s-c", update(1, 0, vec![-5.0], 10), 0).unwrap();
    let Some(Output::Aggregate(job)) = out.into_iter().next() else {
        panic!("expected an aggregation")
    };
    let mut done = job.run();
    assert!(done.candidate().is_some());
    done.reject("the loss doubled".into());
    assert!(matches!(&done.result, Err(AggregationFailure::Rejected(r)) if r == "the loss doubled"));
    let out = m.aggregated(done, 0);
    // c's update weighed most (10 x 5): the retry asks a and b only.
    assert_eq!(assigned(&out), ["a", "b"]);
    assert_eq!((m.current_round(), m.version()), (Some(1), 0));
    submit(&mut m, "s-a", update(1, 0, vec![0.1], 10), 0).unwrap();
    let (_, out) = submit(&mut m, "s-b", update(1, 0, vec![0.2], 10), 0).unwrap();
    let closed = closed_round(&mut m, out, 0);
    assert!((closed.global[0] - 0.15).abs() < 1e-6, "{:?}", closed.global);
    // The next round asks everyone again.
    let out = m.persisted(0);
    assert_eq!(m.current_round(), Some(2));
    assert_eq!(assigned(&out), ["a", "b", "c"]);
}

#[test]
fn sessions_that_never_connect_are_forgotten() {
    let mut m = machine(settings(2, 1.0), vec![0.0]);
    for i in 0..400 {
        m.join(&format!("flood-{i}"), &format!("s-{i}"), 1, None, 0).unwrap();
    }
    m.join("real", "s-real", 1, None, 0).unwrap();
    m.connect("s-real", 0).unwrap();
    m.disconnect("s-real", 10);
    assert_eq!(m.node_views().len(), 401);
    m.tick(JOIN_EXPIRY_MS - 1);
    assert_eq!(m.node_views().len(), 401);
    m.tick(JOIN_EXPIRY_MS);
    // The node that connected once keeps its record (and its history).
    let views = m.node_views();
    assert_eq!(views.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(), ["real"]);
    assert!(m.node_of("s-7").is_none());
}

#[test]
fn tasks_carry_the_rounds_learning_rate_and_evaluation_cadence() {
    let mut s = settings(3, 1.0);
    s.total_rounds = 4;
    s.federated_every = 3;
    s.train.lr_schedule = crate::core::training::LrSchedule::Step;
    s.train.lr_step_rounds = 2;
    s.train.lr_decay = 0.5;
    s.train.learning_rate = 0.2;
    let mut m = machine(s, vec![0.0]);
    let mut out = fleet(&mut m);
    let mut seen = Vec::new();
    for round in 1..=4 {
        let Output::Assign { task, .. } = &out[0] else {
            panic!("{out:?}")
        };
        seen.push((task.hyper.learning_rate, task.hyper.evaluate));
        for n in ["a", "b"] {
            submit(&mut m, &format!("s-{n}"), update(round, round - 1, vec![0.0], 1), 0).unwrap();
        }
        let (_, o) = submit(&mut m, "s-c", update(round, round - 1, vec![0.0], 1), 0).unwrap();
        settle(&mut m, o, 0);
        out = m.persisted(0);
    }
    assert_eq!(seen, [(0.2, false), (0.2, false), (0.1, true), (0.1, true)]);
}

#[test]
fn a_refused_update_does_not_hold_the_round_open() {
    let mut m = machine(
        RoundSettings {
            min_available: 3,
            ..settings(2, 1.0)
        },
        vec![0.0],
    );
    fleet(&mut m);
    submit(&mut m, "s-a", update(1, 0, vec![1.0], 1), 0).unwrap();
    submit(&mut m, "s-b", update(1, 0, vec![3.0], 1), 0).unwrap();
    let e = submit(&mut m, "s-c", update(1, 0, vec![f32::INFINITY], 1), 0).unwrap_err();
    assert!(e.is_content());
    let out = m.refuse("s-c", 1, 0);
    let closed = closed_round(&mut m, out, 0);
    assert_eq!(*closed.global, vec![2.0]);
}

#[test]
fn a_round_waits_for_its_folds_before_it_closes() {
    let mut m = machine(settings(2, 1.0), vec![0.0, 0.0]);
    fleet(&mut m);
    submit(&mut m, "s-a", update(1, 0, vec![1.0, 1.0], 1), 0).unwrap();
    let (_, mut out) = m.submit("s-b", update(1, 0, vec![3.0, 3.0], 1), 0).unwrap();
    let Some(Output::Fold(job)) = out.pop() else {
        panic!("expected a fold, got {out:?}");
    };
    let out = m.disconnect("s-c", 1);
    assert!(out.is_empty(), "closed before the fold finished: {out:?}");
    assert!(m.tick(10_000_000).is_empty(), "the deadline does not cut a fold short");
    let out = m.folded(job.run(), 2);
    let closed = closed_round(&mut m, out, 2);
    assert_eq!(*closed.global, vec![2.0, 2.0]);
}

#[test]
fn a_round_that_keeps_failing_stops_the_run() {
    let mut s = settings(2, 1.0);
    s.max_attempts = 2;
    s.min_available = 3;
    let mut m = machine(s, vec![0.0]);
    fleet(&mut m);
    submit(&mut m, "s-a", update(1, 0, vec![1.0], 1), 0).unwrap();
    assert_eq!(assigned(&m.tick(1000)).len(), 3);
    let out = m.tick(2000);
    let [Output::Abort(reason)] = out.as_slice() else {
        panic!("{out:?}")
    };
    assert_eq!(
        reason,
        "round 1 failed 2 times in a row; stopping the run (the last completed round, 0, is saved)"
    );
    assert_eq!(m.phase(), PhaseKind::Finished);
}

#[test]
fn updates_above_the_refusal_bound_are_refused() {
    let mut strategy = mean(2);
    strategy.max_norm = Some(10.0);
    let mut m = RoundMachine::new(settings(3, 1.0), vec![0.0, 0.0], strategy);
    fleet(&mut m);
    let e = submit(&mut m, "s-a", update(1, 0, vec![30.0, 40.0], 1), 0).unwrap_err();
    assert_eq!(e.to_string(), "update norm 5.0000e1 exceeds the bound 1.0000e1");
    assert!(e.is_content());
    submit(&mut m, "s-a", update(1, 0, vec![3.0, 4.0], 1), 0).unwrap();
}

/// A secure round of five nodes, driven without sockets by real
/// `secagg::Client`s: one node drops after sharing keys (no masked
/// input), one after sending its masked input (no unmasking answer).
/// The round closes with the survivors' weighted mean, within the
/// quantization bound, and a record of who did what.
#[test]
fn a_secure_round_survives_dropouts_and_yields_the_weighted_mean() {
    use fedge_common::secagg::{Client, Quantizer};
    let numel = 6;
    let mut s = settings(3, 1.0);
    s.min_available = 5;
    s.secure = Some(SecureSettings {
        neighbours: 0,
        max_dropout: 0.4,
        range: 1.0,
        step_timeout_ms: 1000,
    });
    let mut m = machine(s, vec![0.0; numel]);
    let names = ["a", "b", "c", "d", "e"];
    let mut tasks = BTreeMap::new();
    for (i, n) in names.iter().enumerate() {
        m.join(n, &format!("s-{n}"), 10 * (i as u64 + 1), None, 0).unwrap();
        for o in m.connect(&format!("s-{n}"), 0).unwrap() {
            if let Output::Assign { node, task } = o {
                tasks.insert(node, task.secure.expect("a secure task"));
            }
        }
    }
    assert_eq!(tasks.len(), 5);
    assert_eq!(tasks["a"].threshold, 3, "⌈0.6 · 5⌉");
    let mut rng = rand::rng();
    let mut clients = BTreeMap::new();
    let mut out = Vec::new();
    for n in names {
        let (c, keys) = Client::new(tasks[n].id, 1, &mut rng);
        clients.insert(n, c);
        out = m
            .secure_message(&format!("s-{n}"), 1, SecAggInput::Advertise(keys), 68, 1)
            .unwrap();
    }
    // The last advertisement closes the step: a roster for everyone.
    let mut shares_out = Vec::new();
    for o in out {
        let Output::SecAgg {
            node,
            message: SecAggOutput::Roster { nodes, neighbours, .. },
        } = o
        else {
            panic!("expected rosters, got {o:?}");
        };
        let c = clients.get_mut(node.as_str()).unwrap();
        let sealed = c.share_keys(&nodes, &neighbours, tasks[&node].threshold).unwrap();
        shares_out.push((node, sealed));
    }
    let mut forwarded = Vec::new();
    for (node, sealed) in shares_out {
        forwarded = m
            .secure_message(&format!("s-{node}"), 1, SecAggInput::Shares(sealed), 500, 2)
            .unwrap();
    }
    assert_eq!(forwarded.len(), 5);
    for o in forwarded {
        let Output::SecAgg {
            node,
            message: SecAggOutput::Shares { shares, .. },
        } = o
        else {
            panic!("expected shares, got {o:?}");
        };
        clients.get_mut(node.as_str()).unwrap().receive_shares(&shares).unwrap();
    }
    // "d" leaves before sending its input; the others send theirs.
    m.disconnect("s-d", 3);
    let updates: BTreeMap<&str, Vec<f32>> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            (
                *n,
                (0..numel)
                    .map(|j| ((i * numel + j) as f32 * 0.37).sin() * 0.1)
                    .collect(),
            )
        })
        .collect();
    let mut unmask = Vec::new();
    for n in ["a", "b", "c", "e"] {
        let t = &tasks[n];
        let mut values: Vec<f32> = updates[n].iter().map(|v| v * t.weight as f32).collect();
        values.push(1.0);
        let q: Quantizer = t.quantizer;
        let masked = clients[n].mask(&q.quantize(&values, &mut rng));
        let bits: Vec<f32> = masked.iter().map(|w| f32::from_bits(*w)).collect();
        let mut u = update(1, 0, vec![0.0; numel], 10);
        u.body.source = Arc::new(bits);
        u.body.non_finite = None;
        unmask = submit(&mut m, &format!("s-{n}"), u, 4).unwrap().1;
    }
    // The masked inputs are not the updates: a masked value is anywhere in the ring.
    let requests: Vec<(String, fedge_common::secagg::UnmaskRequest)> = unmask
        .into_iter()
        .map(|o| match o {
            Output::SecAgg {
                node,
                message: SecAggOutput::Unmask { request, .. },
            } => (node, request),
            other => panic!("expected unmasking requests, got {other:?}"),
        })
        .collect();
    assert_eq!(requests.len(), 4);
    assert_eq!(requests[0].1.dropped, vec![tasks["d"].id]);
    // "e" leaves without answering; the other three are the threshold.
    m.disconnect("s-e", 5);
    let mut closing = Vec::new();
    for (node, req) in requests.iter().filter(|(n, _)| n != "e") {
        let reveal = clients.get_mut(node.as_str()).unwrap().unmask(req).unwrap();
        closing = m
            .secure_message(&format!("s-{node}"), 1, SecAggInput::Reveal(reveal), 100, 6)
            .unwrap();
    }
    let closed = closed_round(&mut m, closing, 6);
    let survivors = ["a", "b", "c", "e"];
    let wsum: f64 = survivors.iter().map(|n| tasks[*n].weight).sum();
    let step = tasks["a"].quantizer.step();
    for (j, got) in closed.global.iter().enumerate() {
        let expected: f64 = survivors
            .iter()
            .map(|n| tasks[*n].weight * f64::from(updates[*n][j]))
            .sum::<f64>()
            / wsum;
        let got = f64::from(*got);
        assert!(
            (got - expected).abs() <= 4.0 * step / wsum + 1e-6,
            "value {j}: {got} against {expected}"
        );
    }
    let rec = closed.secure.expect("a secure record");
    assert_eq!(
        (
            rec.selected,
            rec.advertised,
            rec.shared,
            rec.survivors,
            rec.dropped,
            rec.revealed
        ),
        (5, 5, 5, 4, 1, 3)
    );
    assert_eq!(closed.contributions.len(), 4);
    assert!(closed.contributions.iter().all(|c| c.update_norm.is_nan()));
}

#[test]
fn secure_messages_out_of_step_or_from_strangers_are_refused() {
    use fedge_common::secagg::Client;
    let mut s = settings(3, 1.0);
    s.secure = Some(SecureSettings {
        neighbours: 0,
        max_dropout: 0.3,
        range: 1.0,
        step_timeout_ms: 1000,
    });
    let mut m = machine(s, vec![0.0; 4]);
    fleet(&mut m);
    m.join("z", "s-z", 10, None, 0).unwrap();
    let (_, keys) = Client::new(0, 1, &mut rand::rng());
    let err = |r: Result<Vec<Output>, Rejection>| r.unwrap_err().to_string();
    // "a" is number 0 (names in order): its keys are taken, once.
    assert!(
        m.secure_message("s-a", 1, SecAggInput::Advertise(keys.clone()), 0, 1)
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        err(m.secure_message("s-a", 1, SecAggInput::Advertise(keys.clone()), 0, 1)),
        "secure aggregation: node 0 advertised twice"
    );
    let (_, wrong) = Client::new(2, 1, &mut rand::rng());
    assert_eq!(
        err(m.secure_message("s-b", 1, SecAggInput::Advertise(wrong), 0, 1)),
        "secure aggregation: node b is number 1 in this round, not 2"
    );
    assert_eq!(
        err(m.secure_message("s-b", 1, SecAggInput::Shares(Vec::new()), 0, 1)),
        "secure aggregation: shares came while the round is advertising"
    );
    assert_eq!(
        err(m.secure_message("s-b", 2, SecAggInput::Shares(Vec::new()), 0, 1)),
        "update for round 2; round 1 is in progress"
    );
    assert!(err(m.secure_message("s-z", 1, SecAggInput::Advertise(keys), 0, 1)).contains("not selected"));
    // A masked input from a node that shared no keys cannot be unmasked.
    let err = submit(&mut m, "s-c", update(1, 0, vec![0.0; 5], 10), 2)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "secure aggregation: node c did not share its keys in round 1, so its masked input could never be unmasked"
    );
}

#[test]
fn a_secure_round_with_too_few_keys_is_retried_at_the_step_deadline() {
    let mut s = settings(3, 1.0);
    s.secure = Some(SecureSettings {
        neighbours: 0,
        max_dropout: 0.3,
        range: 1.0,
        step_timeout_ms: 1000,
    });
    let mut m = machine(s, vec![0.0; 4]);
    fleet(&mut m);
    let (_, keys) = fedge_common::secagg::Client::new(0, 1, &mut rand::rng());
    assert!(
        m.secure_message("s-a", 1, SecAggInput::Advertise(keys), 0, 1)
            .unwrap()
            .is_empty()
    );
    assert!(m.tick(999).is_empty());
    let out = m.tick(1000);
    assert_eq!(assigned(&out), ["a", "b", "c"], "a fresh attempt with fresh keys");
    assert_eq!(m.secure_round().map(|(step, _)| step), Some(Step::Advertising));
}
