//! Asynchronous training (FedBuff) driven without sockets or threads:
//! staleness weights, buffers and their steps, concurrency, refusals,
//! resumption, and one step against one synchronous FedAvg round.

use proptest::prelude::{Just, ProptestConfig, prop, prop_assert, prop_assert_eq, prop_oneof, proptest};
use proptest::strategy::Strategy as _;

use super::*;

fn async_settings(k: usize, concurrency: usize, max_staleness: u64, weight: StalenessWeight) -> RoundSettings {
    RoundSettings {
        total_rounds: 100,
        min_available: k,
        asynchronous: Some(AsyncSettings {
            concurrency,
            buffer_size: k,
            max_staleness,
            weight,
            first_task: 1,
            applied: BTreeSet::new(),
        }),
        ..settings(1, 1.0)
    }
}

const SQRT: StalenessWeight = StalenessWeight::Polynomial { exponent: 0.5 };

/// Joins and connects `names` (100 samples each); returns every output.
fn connect_all(m: &mut RoundMachine, names: &[&str]) -> Vec<Output> {
    let mut out = Vec::new();
    for n in names {
        m.join(n, &format!("s-{n}"), 100, None, 0).unwrap();
        out.extend(m.connect(&format!("s-{n}"), 0).unwrap());
    }
    out
}

/// The tasks in `out`, by node.
fn tasks(out: &[Output]) -> BTreeMap<String, Task> {
    out.iter()
        .filter_map(|o| match o {
            Output::Assign { node, task } => Some((node.clone(), task.clone())),
            _ => None,
        })
        .collect()
}

/// `node`'s update for `task` from `base`: `delta` over 100 samples.
fn answer(task: &Task, base: u64, delta: Vec<f32>) -> Update {
    update(task.round, base, delta, 100)
}

fn aggregates(out: &[Output]) -> usize {
    out.iter().filter(|o| matches!(o, Output::Aggregate(_))).count()
}

/// Runs the server step in `out` as the driver would: the step it closes,
/// and the tasks handed out once its model is made.
fn step(m: &mut RoundMachine, out: Vec<Output>, now: u64) -> (ClosedRound, BTreeMap<String, Task>) {
    let jobs: Vec<Output> = out.into_iter().filter(|o| matches!(o, Output::Aggregate(_))).collect();
    assert_eq!(jobs.len(), 1, "one server step");
    let out = settle(m, jobs, now);
    let closed = out.iter().find_map(|o| match o {
        Output::Close(c) => Some(c.clone()),
        _ => None,
    });
    (closed.expect("the step made a model"), tasks(&out))
}

#[test]
fn staleness_weights_follow_their_formulas() {
    assert_eq!(StalenessWeight::Constant.factor(7), 1.0);
    assert_eq!(SQRT.factor(0), 1.0);
    assert!((SQRT.factor(3) - 0.5).abs() < 1e-12);
    let poly = StalenessWeight::Polynomial { exponent: 2.0 };
    assert!((poly.factor(1) - 0.25).abs() < 1e-12);
    let hinge = StalenessWeight::Hinge { a: 10.0, b: 4 };
    assert_eq!(hinge.factor(4), 1.0);
    assert!((hinge.factor(6) - 1.0 / 21.0).abs() < 1e-12);
    assert_eq!(SQRT.to_string(), "1/sqrt(1+s)");
}

#[test]
fn concurrency_stays_full_and_a_buffer_takes_one_update_per_node() {
    let mut m = machine(async_settings(2, 3, 10, SQRT), vec![0.0]);
    let out = connect_all(&mut m, &["a", "b", "c", "d"]);
    let first = tasks(&out);
    // Three train at once, each from version 0, with task numbers 1, 2, 3.
    assert_eq!(first.len(), 3);
    assert!(first.values().all(|t| t.version == 0));
    let mut numbers: Vec<u64> = first.values().map(|t| t.round).collect();
    numbers.sort_unstable();
    assert_eq!(numbers, [1, 2, 3]);
    assert_eq!(m.phase(), PhaseKind::Async);
    let idle = ["a", "b", "c", "d"]
        .into_iter()
        .find(|n| !first.contains_key(*n))
        .unwrap();

    // The first to deliver leaves a slot: the idle node takes it at once,
    // not the one that delivered (its update is in the open buffer).
    let (one, two) = {
        let mut names = first.keys();
        (names.next().unwrap().clone(), names.next().unwrap().clone())
    };
    let (n, out) = submit(&mut m, &format!("s-{one}"), answer(&first[&one], 0, vec![1.0]), 10).unwrap();
    assert_eq!(n, 1);
    assert_eq!(tasks(&out).keys().collect::<Vec<_>>(), [idle]);
    assert_eq!(m.async_view().unwrap().in_flight, 3);
    assert_eq!(
        m.node_views().iter().find(|v| v.name == one).unwrap().state,
        "delivered"
    );

    // The second fills the buffer (K = 2): the step starts and a new buffer
    // opens; the free slot waits for the step's model.
    let (n, out) = submit(&mut m, &format!("s-{two}"), answer(&first[&two], 0, vec![3.0]), 20).unwrap();
    assert_eq!(n, 2);
    assert!(tasks(&out).is_empty());
    let view = m.async_view().unwrap();
    assert_eq!((view.in_flight, view.buffered, view.waiting_steps), (2, 0, 1));
    // Once the step has made version 1, one of the two that delivered
    // takes the slot, from version 1.
    let (closed, next) = step(&mut m, out, 30);
    assert_eq!(closed.version, 1);
    assert_eq!(next.len(), 1);
    assert!(next.contains_key(&one) || next.contains_key(&two));
    assert!(next.values().all(|t| t.version == 1));
    assert_eq!(m.async_view().unwrap().in_flight, 3);
}

#[test]
fn a_full_buffer_makes_a_server_step_and_later_updates_weigh_by_staleness() {
    let mut m = machine(async_settings(2, 0, 10, SQRT), vec![0.0]);
    let first = tasks(&connect_all(&mut m, &["a", "b", "c"]));
    assert_eq!(first.len(), 3);
    submit(&mut m, "s-a", answer(&first["a"], 0, vec![1.0]), 10).unwrap();
    let (_, out) = submit(&mut m, "s-b", answer(&first["b"], 0, vec![3.0]), 20).unwrap();
    let (closed, second) = step(&mut m, out, 30);
    assert_eq!((closed.round, closed.version), (1, 1));
    assert_eq!(*closed.global, vec![2.0]);
    assert!(closed.contributions.iter().all(|c| c.staleness.unwrap().versions == 0));
    // a and b start again from the step's model, version 1 (their fetch
    // waits until it is saved).
    assert_eq!(second.keys().collect::<Vec<_>>(), ["a", "b"]);
    assert!(second.values().all(|t| t.version == 1 && t.round > 3));
    assert!(m.persisted(40).is_empty());
    assert_eq!(m.async_view().unwrap().durable_version, 1);
    assert_eq!(m.admit_fetch("s-a", 1).unwrap(), "a");

    // c trained from version 0, now one behind: it weighs 1/sqrt(2) and
    // shortens the step (FedBuff); a is up to date.
    submit(&mut m, "s-c", answer(&first["c"], 0, vec![2.0]), 50).unwrap();
    let (_, out) = submit(&mut m, "s-a", answer(&second["a"], 1, vec![2.0]), 60).unwrap();
    let (closed, _) = step(&mut m, out, 70);
    let expected = 2.0 + (2.0 / 2f64.sqrt() + 2.0) / 2.0;
    assert!(
        (f64::from(closed.global[0]) - expected).abs() < 1e-6,
        "{:?}",
        closed.global
    );
    let staleness: Vec<(u64, f64)> = closed
        .contributions
        .iter()
        .map(|c| (c.staleness.unwrap().versions, c.staleness.unwrap().factor))
        .collect();
    assert_eq!(staleness[0].0, 1);
    assert!((staleness[0].1 - 1.0 / 2f64.sqrt()).abs() < 1e-12);
    assert_eq!(staleness[1], (0, 1.0));
    m.persisted(80);
    assert_eq!(m.async_view().unwrap().durable_version, 2);
    // A node that comes back now trains from the saved version 2.
    m.disconnect("s-b", 90);
    m.join("b", "s-b2", 100, None, 91).unwrap();
    let out = m.connect("s-b2", 92).unwrap();
    assert_eq!(tasks(&out)["b"].version, 2);
}

#[test]
fn an_update_staler_than_the_bound_is_refused_and_its_node_gets_a_new_task() {
    let mut m = machine(async_settings(2, 0, 0, SQRT), vec![0.0]);
    let first = tasks(&connect_all(&mut m, &["a", "b", "c"]));
    submit(&mut m, "s-a", answer(&first["a"], 0, vec![1.0]), 10).unwrap();
    let (_, out) = submit(&mut m, "s-b", answer(&first["b"], 0, vec![1.0]), 20).unwrap();
    step(&mut m, out, 30);
    m.persisted(40);
    let e = submit(&mut m, "s-c", answer(&first["c"], 0, vec![1.0]), 50).unwrap_err();
    assert_eq!(
        e,
        Rejection::TooStale {
            base: 0,
            current: 1,
            max: 0
        }
    );
    assert_eq!(
        e.to_string(),
        "update computed against model version 0 is 1 versions behind the current version 1; this run accepts \
         updates at most 0 versions behind (async.max_staleness)"
    );
    // The driver ends the refused task; the node trains again from version 1.
    let out = m.refuse("s-c", first["c"].round, 51);
    let again = tasks(&out);
    assert_eq!(again["c"].version, 1);
    // The old task is over.
    let e = submit(&mut m, "s-c", answer(&first["c"], 1, vec![1.0]), 52).unwrap_err();
    assert_eq!(
        e,
        Rejection::NoSuchTask {
            node: "c".into(),
            task: first["c"].round
        }
    );
}

#[test]
fn a_fetch_is_served_the_newest_saved_version_which_the_update_must_start_from() {
    let mut m = machine(async_settings(2, 0, 10, SQRT), vec![0.0]);
    let first = tasks(&connect_all(&mut m, &["a", "b", "c"]));
    submit(&mut m, "s-a", answer(&first["a"], 0, vec![1.0]), 10).unwrap();
    let (_, out) = submit(&mut m, "s-b", answer(&first["b"], 0, vec![1.0]), 20).unwrap();
    step(&mut m, out, 30);
    // Being saved: a fetch of version 1 may wait for it, and serves nothing yet.
    assert_eq!(m.admit_fetch("s-c", 1).unwrap(), "c");
    assert!(m.admit_fetch("s-c", 2).is_err());
    let e = submit(&mut m, "s-c", answer(&first["c"], 1, vec![1.0]), 35).unwrap_err();
    assert_eq!(e, Rejection::WrongBaseVersion { got: 1, current: 0 });
    m.persisted(40);
    // c's task named version 0; it fetches now and gets version 1.
    assert_eq!(m.admit_fetch("s-c", 1).unwrap(), "c");
    let e = submit(&mut m, "s-c", answer(&first["c"], 0, vec![1.0]), 50).unwrap_err();
    assert_eq!(e, Rejection::WrongBaseVersion { got: 0, current: 1 });
    let (n, _) = submit(&mut m, "s-c", answer(&first["c"], 1, vec![1.0]), 51).unwrap();
    assert_eq!(n, 1);
    // A node without a task fetches nothing.
    assert!(m.admit_fetch("s-c", 1).is_err());
}

#[test]
fn a_node_that_leaves_or_misses_its_deadline_is_replaced_at_once() {
    let mut m = machine(async_settings(2, 2, 10, SQRT), vec![0.0]);
    let first = tasks(&connect_all(&mut m, &["a", "b", "c", "d"]));
    assert_eq!(first.len(), 2);
    let gone = first.keys().next().unwrap().clone();
    let out = m.disconnect(&format!("s-{gone}"), 5);
    let replacement = tasks(&out);
    assert_eq!(replacement.len(), 1);
    assert!(!first.contains_key(replacement.keys().next().unwrap()));
    // Past the deadline (1 s) both tasks expire; those nodes go last, so
    // the one idle node left is picked first.
    assert!(m.tick(999).is_empty());
    let out = m.tick(1005);
    let after = tasks(&out);
    assert_eq!(after.len(), 2);
    let training: Vec<&String> = first.keys().chain(replacement.keys()).filter(|n| **n != gone).collect();
    let idle = ["a", "b", "c", "d"]
        .into_iter()
        .find(|n| *n != gone && !training.iter().any(|t| t == n))
        .unwrap();
    assert!(after.contains_key(idle), "{after:?}");
}

#[test]
fn updates_keep_arriving_while_a_step_is_aggregated_and_saved() {
    let mut m = machine(async_settings(2, 0, 10, StalenessWeight::Constant), vec![0.0]);
    let first = tasks(&connect_all(&mut m, &["a", "b", "c", "d"]));
    submit(&mut m, "s-a", answer(&first["a"], 0, vec![1.0]), 10).unwrap();
    let (_, step1) = submit(&mut m, "s-b", answer(&first["b"], 0, vec![1.0]), 20).unwrap();
    assert_eq!(aggregates(&step1), 1);
    // While step 1 aggregates: c is accepted at staleness 0.
    submit(&mut m, "s-c", answer(&first["c"], 0, vec![5.0]), 25).unwrap();
    let closed = step(&mut m, step1, 30).0;
    assert_eq!(closed.version, 1);
    // While version 1 is saved: d is one behind and fills buffer 2, whose
    // step waits for the save.
    let (n, out) = submit(&mut m, "s-d", answer(&first["d"], 0, vec![5.0]), 35).unwrap();
    assert_eq!((n, aggregates(&out)), (2, 0));
    assert_eq!(m.async_view().unwrap().waiting_steps, 1);
    let out = m.persisted(40);
    assert_eq!(aggregates(&out), 1);
    let closed = step(&mut m, out, 50).0;
    assert_eq!(closed.version, 2);
    assert_eq!(*closed.global, vec![6.0]);
    let staleness: Vec<u64> = closed
        .contributions
        .iter()
        .map(|c| c.staleness.unwrap().versions)
        .collect();
    assert_eq!(staleness, [0, 1]);
}

#[test]
fn a_rejected_step_drops_its_buffer_and_the_run_goes_on() {
    let mut m = machine(async_settings(2, 0, 10, StalenessWeight::Constant), vec![0.0]);
    let first = tasks(&connect_all(&mut m, &["a", "b", "c"]));
    submit(&mut m, "s-a", answer(&first["a"], 0, vec![1.0]), 10).unwrap();
    let (_, out) = submit(&mut m, "s-b", answer(&first["b"], 0, vec![100.0]), 20).unwrap();
    let Some(Output::Aggregate(job)) = out.into_iter().find(|o| matches!(o, Output::Aggregate(_))) else {
        panic!("no step")
    };
    let mut done = job.run();
    done.reject("the new model's loss is too high".into());
    // The nodes that waited for the step start again from version 0.
    let again = tasks(&m.aggregated(done, 30));
    assert_eq!(again.keys().collect::<Vec<_>>(), ["a", "b"]);
    assert!(again.values().all(|t| t.version == 0));
    assert_eq!(m.version(), 0);
    assert_eq!(**m.global().in_memory().unwrap(), vec![0.0]);
    // The next buffer makes the next step from version 0.
    submit(&mut m, "s-c", answer(&first["c"], 0, vec![2.0]), 40).unwrap();
    assert_eq!(m.async_view().unwrap().buffered, 1);
    let (_, out) = submit(&mut m, "s-a", answer(&again["a"], 0, vec![4.0]), 50).unwrap();
    let closed = step(&mut m, out, 60).0;
    assert_eq!((closed.version, closed.global[0]), (1, 3.0));
}

#[test]
fn the_run_finishes_after_its_last_step_is_saved() {
    let mut m = machine(
        RoundSettings {
            total_rounds: 1,
            ..async_settings(2, 0, 10, SQRT)
        },
        vec![0.0],
    );
    let first = tasks(&connect_all(&mut m, &["a", "b"]));
    submit(&mut m, "s-a", answer(&first["a"], 0, vec![1.0]), 10).unwrap();
    let (_, out) = submit(&mut m, "s-b", answer(&first["b"], 0, vec![1.0]), 20).unwrap();
    step(&mut m, out, 30);
    assert!(matches!(m.persisted(40).as_slice(), [Output::Finished]));
    assert_eq!(m.phase(), PhaseKind::Finished);
}

#[test]
fn a_resumed_run_continues_from_its_saved_version_with_new_task_numbers() {
    let mut s = async_settings(2, 0, 10, SQRT);
    if let Some(a) = &mut s.asynchronous {
        a.first_task = (1 << 32) + 1;
    }
    let n = 1;
    let mut m = RoundMachine::resume(s, 5, Arc::new(vec![1.0]), mean(n));
    let first = tasks(&connect_all(&mut m, &["a", "b"]));
    assert!(first.values().all(|t| t.version == 5 && t.round > 1 << 32));
    submit(&mut m, "s-a", answer(&first["a"], 5, vec![1.0]), 10).unwrap();
    let (_, out) = submit(&mut m, "s-b", answer(&first["b"], 5, vec![1.0]), 20).unwrap();
    let closed = step(&mut m, out, 30).0;
    assert_eq!((closed.version, closed.global[0]), (6, 2.0));
}

/// One synchronous round of `deltas` (all nodes, FedAvg) and one
/// asynchronous step of the same updates with K = the fleet, no staleness
/// and constant weights: the new global models.
fn sync_and_async(deltas: &[(Vec<f32>, u64)], opt: ServerOpt) -> (Vec<f32>, Vec<f32>) {
    let n = deltas.len();
    let numel = deltas[0].0.len();
    let strategy = || {
        Strategy::new(
            Aggregator::Mean,
            ServerOptimizer::new(opt, 0.5, numel),
            None,
            false,
            numel,
        )
    };
    let names: Vec<String> = (0..n).map(|i| format!("n{i}")).collect();
    let initial = vec![0.25f32; numel];

    let mut sync = RoundMachine::new(
        RoundSettings {
            min_available: n,
            ..settings(n, 1.0)
        },
        initial.clone(),
        strategy(),
    );
    let mut async_ = RoundMachine::new(
        RoundSettings {
            min_available: n,
            ..async_settings(n, 0, 0, StalenessWeight::Constant)
        },
        initial,
        strategy(),
    );
    let mut given = BTreeMap::new();
    for (i, name) in names.iter().enumerate() {
        sync.join(name, name, deltas[i].1, None, 0).unwrap();
        sync.connect(name, 0).unwrap();
        async_.join(name, name, deltas[i].1, None, 0).unwrap();
        given.extend(tasks(&async_.connect(name, 0).unwrap()));
    }
    let mut sync_out = Vec::new();
    let mut async_out = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let (delta, samples) = &deltas[i];
        sync_out = submit(&mut sync, name, update(1, 0, delta.clone(), *samples), 1)
            .unwrap()
            .1;
        let task = &given[name];
        async_out.extend(
            submit(&mut async_, name, update(task.round, 0, delta.clone(), *samples), 1)
                .unwrap()
                .1,
        );
    }
    let pick =
        |out: Vec<Output>| -> Vec<Output> { out.into_iter().filter(|o| matches!(o, Output::Aggregate(_))).collect() };
    let a = closed_round(&mut sync, pick(sync_out), 2);
    let b = step(&mut async_, async_out, 2).0;
    ((*a.global).clone(), (*b.global).clone())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// With K equal to the fleet, zero staleness and constant weights, one
    /// asynchronous step is one synchronous FedAvg round.
    #[test]
    fn one_async_step_equals_one_fedavg_round(
        deltas in (1usize..5).prop_flat_map(|numel| {
            prop::collection::vec((prop::collection::vec(-2.0f32..2.0, numel), 1u64..500), 2..7)
        }),
        opt in prop_oneof![
            Just(ServerOpt::Sgd),
            Just(ServerOpt::Momentum { beta: 0.9 }),
            Just(ServerOpt::Adam { beta1: 0.9, beta2: 0.99, tau: 1e-3 }),
            Just(ServerOpt::Yogi { beta1: 0.9, beta2: 0.99, tau: 1e-3 }),
            Just(ServerOpt::Adagrad { beta1: 0.0, tau: 1e-3 }),
        ],
    ) {
        let (sync, async_) = sync_and_async(&deltas, opt);
        prop_assert_eq!(sync.len(), async_.len());
        for (s, a) in sync.iter().zip(&async_) {
            prop_assert!((s - a).abs() <= 1e-6 * (1.0 + s.abs()), "sync {:?} async {:?}", sync, async_);
        }
    }
}

#[test]
fn an_update_trained_before_a_restart_is_taken_once_from_a_node_without_a_task() {
    let mut s = async_settings(2, 0, 1, SQRT);
    if let Some(a) = &mut s.asynchronous {
        a.first_task = (1 << 32) + 1;
    }
    let mut m = RoundMachine::resume(s, 3, Arc::new(vec![0.0]), mean(1));
    assert_eq!(m.phase(), PhaseKind::Waiting);
    // a rejoined the restarted coordinator and, before asking for tasks,
    // sends what it trained for task 7 from version 3.
    m.join("a", "s-a", 100, None, 0).unwrap();
    let (n, _) = submit(&mut m, "s-a", update(7, 3, vec![2.0], 100), 1).unwrap();
    assert_eq!(n, 1);
    // Once per node, and only for tasks of an earlier start.
    let once = submit(&mut m, "s-a", update(8, 3, vec![2.0], 100), 2).unwrap_err();
    assert_eq!(
        once,
        Rejection::NoSuchTask {
            node: "a".into(),
            task: 8
        }
    );
    m.join("b", "s-b", 100, None, 3).unwrap();
    let future = submit(&mut m, "s-b", update((1 << 32) + 5, 3, vec![2.0], 100), 4).unwrap_err();
    assert!(matches!(future, Rejection::NoSuchTask { .. }), "{future:?}");
    // From a version not saved before the restart: refused; too stale: refused.
    let unsaved = submit(&mut m, "s-b", update(9, 4, vec![2.0], 100), 5).unwrap_err();
    assert_eq!(
        unsaved,
        Rejection::NoSuchTask {
            node: "b".into(),
            task: 9
        }
    );
    let stale = submit(&mut m, "s-b", update(9, 1, vec![2.0], 100), 6).unwrap_err();
    assert_eq!(
        stale,
        Rejection::TooStale {
            base: 1,
            current: 3,
            max: 1
        }
    );
    // b's own carried update fills the buffer with a's: step 4.
    let (_, out) = submit(&mut m, "s-b", update(9, 2, vec![4.0], 100), 7).unwrap();
    let (closed, _) = step(&mut m, out, 8);
    assert_eq!(closed.version, 4);
    let factor = 1.0 / 2f64.sqrt();
    assert!((f64::from(closed.global[0]) - (2.0 + 4.0 * factor) / 2.0).abs() < 1e-6);
    // Connected nodes get new tasks, numbered in this start's range.
    m.persisted(9);
    let out = connect_all_again(&mut m, &["a", "b"]);
    assert!(tasks(&out).values().all(|t| t.round > 1 << 32 && t.version == 4));
}

/// Connects nodes that joined already; returns every output.
fn connect_all_again(m: &mut RoundMachine, names: &[&str]) -> Vec<Output> {
    let mut out = Vec::new();
    for n in names {
        out.extend(m.connect(&format!("s-{n}"), 10).unwrap());
    }
    out
}

#[test]
fn a_node_whose_stream_closes_gives_up_its_slot_but_its_update_still_counts() {
    let mut m = machine(async_settings(2, 2, 10, SQRT), vec![0.0]);
    let first = tasks(&connect_all(&mut m, &["a", "b", "c"]));
    let (gone, stays) = {
        let mut names = first.keys();
        (names.next().unwrap().clone(), names.next().unwrap().clone())
    };
    let out = m.disconnect(&format!("s-{gone}"), 5);
    assert_eq!(tasks(&out).keys().collect::<Vec<_>>(), ["c"]);
    // It trained on and sends its update over the same session.
    let (n, _) = submit(&mut m, &format!("s-{gone}"), answer(&first[&gone], 0, vec![1.0]), 10).unwrap();
    assert_eq!(n, 1);
    let (_, out) = submit(&mut m, &format!("s-{stays}"), answer(&first[&stays], 0, vec![3.0]), 20).unwrap();
    assert_eq!(step(&mut m, out, 30).0.global[0], 2.0);
}

#[test]
fn nodes_train_again_for_a_buffer_no_other_node_can_fill() {
    let mut m = machine(async_settings(3, 0, 10, StalenessWeight::Constant), vec![0.0]);
    let first = tasks(&connect_all(&mut m, &["a", "b", "c"]));
    m.disconnect("s-c", 1);
    submit(&mut m, "s-a", answer(&first["a"], 0, vec![1.0]), 10).unwrap();
    // b's update leaves no node that is training or free: a and b train again.
    let (_, out) = submit(&mut m, "s-b", answer(&first["b"], 0, vec![2.0]), 20).unwrap();
    let again = tasks(&out);
    assert_eq!(again.keys().collect::<Vec<_>>(), ["a", "b"]);
    let (_, out) = submit(&mut m, "s-a", answer(&again["a"], 0, vec![3.0]), 30).unwrap();
    let closed = step(&mut m, out, 40).0;
    assert_eq!(closed.global[0], 2.0);
    assert_eq!(closed.contributions.len(), 3);
}

#[test]
fn server_steps_that_keep_failing_stop_the_run() {
    let mut m = machine(
        RoundSettings {
            max_attempts: 2,
            ..async_settings(2, 0, 10, SQRT)
        },
        vec![0.0],
    );
    let mut given = tasks(&connect_all(&mut m, &["a", "b"]));
    for attempt in 1..=2 {
        submit(&mut m, "s-a", answer(&given["a"], 0, vec![1.0]), 10).unwrap();
        let (_, out) = submit(&mut m, "s-b", answer(&given["b"], 0, vec![1.0]), 20).unwrap();
        let Some(Output::Aggregate(job)) = out.into_iter().find(|o| matches!(o, Output::Aggregate(_))) else {
            panic!("no step")
        };
        let mut done = job.run();
        done.reject("the loss is too high".into());
        let out = m.aggregated(done, 30);
        if attempt == 1 {
            given = tasks(&out);
        } else {
            let [Output::Abort(why)] = out.as_slice() else {
                panic!("{out:?}")
            };
            assert!(why.starts_with("server step 1 failed 2 times in a row"), "{why}");
        }
    }
    assert_eq!(m.phase(), PhaseKind::Finished);
}

#[test]
fn only_a_resumed_run_takes_kept_updates_and_never_one_a_saved_step_applied() {
    // A fresh run has no earlier start: task 0 is no kept update.
    let mut m = machine(async_settings(2, 0, 10, SQRT), vec![0.0]);
    m.join("a", "s-a", 100, None, 0).unwrap();
    let e = submit(&mut m, "s-a", update(0, 0, vec![1.0], 100), 1).unwrap_err();
    assert_eq!(
        e,
        Rejection::NoSuchTask {
            node: "a".into(),
            task: 0
        }
    );

    let mut s = async_settings(2, 0, 10, SQRT);
    if let Some(a) = &mut s.asynchronous {
        a.first_task = (1 << 32) + 1;
        a.applied = BTreeSet::from([("a".to_string(), 7)]);
    }
    let mut m = RoundMachine::resume(s, 3, Arc::new(vec![0.0]), mean(1));
    m.join("a", "s-a", 100, None, 0).unwrap();
    let e = submit(&mut m, "s-a", update(7, 2, vec![1.0], 100), 1).unwrap_err();
    assert_eq!(
        e,
        Rejection::NoSuchTask {
            node: "a".into(),
            task: 7
        }
    );
    submit(&mut m, "s-a", update(8, 2, vec![1.0], 100), 2).unwrap();
}

#[test]
fn the_first_fetch_of_a_task_fixes_its_version() {
    let mut m = machine(async_settings(2, 0, 10, SQRT), vec![0.0]);
    let first = tasks(&connect_all(&mut m, &["a", "b", "c"]));
    submit(&mut m, "s-a", answer(&first["a"], 0, vec![1.0]), 10).unwrap();
    let (_, out) = submit(&mut m, "s-b", answer(&first["b"], 0, vec![1.0]), 20).unwrap();
    step(&mut m, out, 30);
    // c fetches version 0 (its task's), then tries to have version 1 count.
    assert_eq!(m.admit_fetch("s-c", 0).unwrap(), "c");
    m.persisted(40);
    assert!(m.admit_fetch("s-c", 1).is_err());
    let e = submit(&mut m, "s-c", answer(&first["c"], 1, vec![1.0]), 50).unwrap_err();
    assert_eq!(e, Rejection::WrongBaseVersion { got: 1, current: 0 });
    submit(&mut m, "s-c", answer(&first["c"], 0, vec![1.0]), 60).unwrap();
}
