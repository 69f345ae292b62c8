//! Unit tests of the configuration: defaults, the example file, and each
//! refusal's message.

use std::time::Duration;

use super::*;

fn with(k: &str, v: &str) -> String {
    CoordinatorConfig::load_with_env(None, [], &[(k.into(), v.into())])
        .unwrap_err()
        .to_string()
}

#[test]
fn defaults_are_valid_once_transport_security_is_chosen_and_the_example_lists_them() {
    let err = CoordinatorConfig::default().validate().unwrap_err().to_string();
    assert!(
        err.contains("no TLS certificate configured") && err.contains("security.insecure = true"),
        "{err}"
    );
    let mut insecure = CoordinatorConfig::default();
    insecure.security.insecure = true;
    insecure.validate().unwrap();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("coordinator.example.toml");
    assert_eq!(
        CoordinatorConfig::load_with_env(Some(&example), [], &[("security.insecure".into(), "true".into())]).unwrap(),
        insecure
    );
}

#[test]
fn simulation_settings_are_checked() {
    let mut c = CoordinatorConfig::default();
    c.security.insecure = true;
    c.simulation.nodes = 0;
    assert_eq!(
        c.validate().unwrap_err().to_string(),
        "invalid configuration: simulation.nodes must be at least 1"
    );
    c.simulation.nodes = 10;
    c.simulation.partition = "dirichlet".into();
    c.simulation.alpha = -1.0;
    let err = c.validate().unwrap_err().to_string();
    assert!(err.starts_with("invalid configuration: simulation: "), "{err}");
    assert!(err.contains("alpha"), "{err}");
}

#[test]
fn bad_values_are_named() {
    assert_eq!(with("rounds", "0"), "invalid configuration: rounds must be at least 1");
    assert_eq!(
        with("sampling.fraction", "1.5"),
        "invalid configuration: sampling.fraction must be in (0, 1], got 1.5"
    );
    assert_eq!(
        with("sampling.min_available", "1"),
        "invalid configuration: sampling.min_available (1) must be at least sampling.min_nodes (2)"
    );
    assert_eq!(
        with("model", "vgg"),
        "unknown model `vgg` (this build knows: cnn, cnn-wide, cnn-xl, mnist-cnn, 2nn, resnet20)"
    );
    assert_eq!(
        with("strategy.aggregator", "\"krum\""),
        "invalid configuration: strategy krum(f=1) needs at least 5 updates per round; \
         set sampling.min_nodes to 5 or more (it is 2)"
    );
    assert_eq!(
        with("strategy.trim_fraction", "0.5"),
        "invalid configuration: strategy.trim_fraction must be in [0, 0.5), got 0.5"
    );
    assert_eq!(
        with("strategy.beta2", "1.0"),
        "invalid configuration: strategy.beta2 must be in [0, 1), got 1"
    );
    assert_eq!(
        with("train.lr_decay", "1.5"),
        "invalid configuration: train.lr_decay must be in (0, 1], got 1.5"
    );
    assert!(with("strategy.aggregator", "\"average\"").contains("average"));
    assert_eq!(
        with("codec.update", "\"zstd\""),
        "invalid configuration: codec: unknown codec `zstd` (expected one of: f32, f16, bf16, int8, topk, sign)"
    );
    assert_eq!(
        with("codec.topk_fraction", "0"),
        "invalid configuration: codec: topk fraction must be in (0, 1], got 0"
    );
    assert!(with("strategy.accumulator", "\"f16\"").contains("f16"));
    assert!(with("train.algorithm", "\"fedsomething\"").contains("fedsomething"));
    let both = CoordinatorConfig::load_with_env(
        None,
        [],
        &[
            ("train.algorithm".into(), "\"scaffold\"".into()),
            ("strategy.aggregator".into(), "\"median\"".into()),
        ],
    )
    .unwrap_err()
    .to_string();
    assert_eq!(
        both,
        "invalid configuration: train.algorithm = \"scaffold\" averages control variates and needs \
         strategy.aggregator = \"mean\", not median"
    );
    let adam = CoordinatorConfig::load_with_env(
        None,
        [],
        &[
            ("train.algorithm".into(), "\"scaffold\"".into()),
            ("train.optimizer".into(), "\"adam\"".into()),
        ],
    )
    .unwrap_err()
    .to_string();
    assert_eq!(
        adam,
        "invalid configuration: train.algorithm = \"scaffold\" estimates control variates from SGD steps \
         and needs train.optimizer = \"sgd\""
    );
    assert!(with("sampling.round_deadline", "soon").contains("round_deadline"));
    assert!(with("listen", "nowhere").contains("listen"));
}

#[test]
fn learning_rate_schedules_follow_the_rounds() {
    let mut t = TrainConfig {
        learning_rate: 0.1,
        ..TrainConfig::default()
    };
    let lr = |t: &TrainConfig| (1..=5).map(|r| t.learning_rate_at(r, 5)).collect::<Vec<_>>();
    assert_eq!(lr(&t), [0.1; 5]);
    t.lr_schedule = LrSchedule::Step;
    t.lr_step_rounds = 2;
    assert_eq!(lr(&t), [0.1, 0.1, 0.05, 0.05, 0.025]);
    t.lr_schedule = LrSchedule::Exponential;
    t.lr_decay = 0.5;
    assert_eq!(lr(&t), [0.1, 0.05, 0.025, 0.0125, 0.00625]);
    t.lr_schedule = LrSchedule::Cosine;
    t.lr_min = 0.02;
    let c = lr(&t);
    assert!(
        (c[0] - 0.1).abs() < 1e-12 && (c[2] - 0.06).abs() < 1e-12 && (c[4] - 0.02).abs() < 1e-12,
        "{c:?}"
    );
}

#[test]
fn the_http_side_must_authenticate_when_nodes_do() {
    let load = |o: &[(&str, &str)]| {
        let mut all = vec![
            ("security.tls_cert".to_string(), "\"c.pem\"".to_string()),
            ("security.tls_key".into(), "\"k.pem\"".into()),
            ("security.client_ca".into(), "\"ca.pem\"".into()),
            ("security.node_auth".into(), "\"certificate\"".into()),
            ("http.listen".into(), "\"0.0.0.0:8080\"".into()),
        ];
        all.extend(o.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        CoordinatorConfig::load_with_env(None, [], &all)
    };
    let err = load(&[]).unwrap_err().to_string();
    assert!(
        err.contains("nodes must authenticate (security.node_auth = \"certificate\")")
            && err.contains("set http.operators"),
        "{err}"
    );
    let c = load(&[("http.operators", "\"operators.toml\"")]).unwrap();
    assert!(c.http.tls(&c.security) && c.http.authenticated(&c.security));
    let c = load(&[("http.insecure", "true")]).unwrap();
    assert!(!c.http.tls(&c.security) && !c.http.authenticated(&c.security));
    let err = load(&[("http.insecure", "true"), ("http.operators", "\"o.toml\"")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("yet operators is set"), "{err}");
    // Plaintext gRPC without node authentication: the HTTP side is open too, unless operators are named.
    let open = CoordinatorConfig::load_with_env(
        None,
        [],
        &[
            ("security.insecure".to_string(), "true".to_string()),
            ("http.listen".into(), "\"127.0.0.1:8080\"".into()),
        ],
    )
    .unwrap();
    assert!(!open.http.tls(&open.security) && !open.http.authenticated(&open.security));
}

#[test]
fn privacy_settings_are_checked_against_the_strategy() {
    let err = |o: &[(&str, &str)]| {
        let mut all = vec![
            ("security.insecure".to_string(), "true".to_string()),
            ("privacy.noise".into(), "\"central\"".into()),
        ];
        all.extend(o.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        CoordinatorConfig::load_with_env(None, [], &all)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    assert_eq!(err(&[]), "");
    assert!(err(&[("strategy.aggregator", "\"median\"")]).contains("needs strategy.aggregator = \"mean\""));
    assert!(err(&[("train.algorithm", "\"scaffold\"")]).contains("control variates that the clipping does not bound"));
    assert!(err(&[("strategy.clip_norm", "2.0")]).contains("set only privacy.clip_norm"));
    assert!(err(&[("privacy.noise_multiplier", "0")]).contains("privacy: noise_multiplier must be positive"));
    assert!(err(&[("privacy.delta", "1.5")]).contains("privacy: delta must be in (0, 1)"));
    assert!(
        err(&[("privacy.adaptive_clip", "true"), ("privacy.target_quantile", "1.0")])
            .contains("target_quantile must be in (0, 1)")
    );
    let e = CoordinatorConfig::load_with_env(
        None,
        [],
        &[
            ("security.insecure".to_string(), "true".to_string()),
            ("privacy.noise".into(), "\"loud\"".into()),
        ],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("privacy.noise") || e.contains("loud"), "{e}");
}

#[test]
fn secure_aggregation_settings_are_checked_against_the_rest() {
    let err = |o: &[(&str, &str)]| {
        let mut all = vec![
            ("security.insecure".to_string(), "true".to_string()),
            ("secure_aggregation.enabled".into(), "true".into()),
            ("sampling.min_nodes".into(), "3".into()),
            ("sampling.min_available".into(), "3".into()),
        ];
        all.extend(o.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        CoordinatorConfig::load_with_env(None, [], &all)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    assert_eq!(err(&[]), "");
    assert_eq!(err(&[("privacy.noise", "\"distributed\"")]), "");
    assert!(err(&[("sampling.min_nodes", "2")]).contains("secure aggregation needs at least 3"));
    assert!(err(&[("secure_aggregation.max_dropout", "0.5")]).contains("max_dropout must be in [0, 0.5)"));
    assert!(err(&[("secure_aggregation.range", "0")]).contains("range must be positive"));
    assert!(err(&[("secure_aggregation.neighbours", "1")]).contains("0 (every node) or at least 2"));
    assert!(err(&[("strategy.aggregator", "\"median\"")]).contains("cannot run strategy.aggregator = \"median\""));
    assert!(err(&[("strategy.max_update_norm", "5.0")]).contains("need each update's norm"));
    assert!(err(&[("train.algorithm", "\"scaffold\"")]).contains("sends control variates"));
    assert!(err(&[("codec.update", "\"topk\"")]).contains("codec.update must be \"f32\""));
    assert!(err(&[("privacy.noise", "\"central\"")]).contains("use \"distributed\""));
}

#[test]
fn security_and_limits_are_checked() {
    let err = |pairs: &[(&str, &str)]| {
        let o: Vec<(String, String)> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        CoordinatorConfig::load_with_env(None, [], &o).unwrap_err().to_string()
    };
    assert_eq!(
        err(&[("security.tls_cert", "\"c.pem\"")]),
        "invalid configuration: security: tls_cert and tls_key go together; set both or neither"
    );
    assert!(
        err(&[("security.insecure", "true"), ("security.node_auth", "\"certificate\"")])
            .contains("node_auth = \"certificate\" needs client_ca")
    );
    assert!(
        err(&[("security.insecure", "true"), ("security.node_auth", "\"token\"")])
            .contains("node_auth = \"token\" needs tokens")
    );
    assert!(
        err(&[
            ("security.insecure", "true"),
            ("security.tls_cert", "\"c.pem\""),
            ("security.tls_key", "\"k.pem\"")
        ])
        .contains("contradicts")
    );
    assert_eq!(
        err(&[("security.insecure", "true"), ("limits.max_concurrent_uploads", "0")]),
        "invalid configuration: limits: max_concurrent_uploads must be at least 1"
    );
    assert!(
        err(&[("security.insecure", "true"), ("limits.max_message_bytes", "1000")])
            .contains("must exceed wire.chunk_bytes")
    );
    // Arrays are given in TOML syntax on the command line too.
    let o = [
        ("security.insecure".to_string(), "true".to_string()),
        ("security.allow".to_string(), "[\"node-1\", \"cam 7\"]".to_string()),
    ];
    let c = CoordinatorConfig::load_with_env(None, [], &o).unwrap();
    assert_eq!(c.security.allow, ["node-1", "cam 7"]);
}

#[test]
fn toml_file_and_overrides_combine() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("c.toml");
    std::fs::write(
        &f,
        "rounds = 3\n[sampling]\nround_deadline = \"90s\"\n[train]\nlearning_rate = 0.1\n[security]\ninsecure = true\n",
    )
    .unwrap();
    let env = [
        ("FEDGE_TRAIN__MOMENTUM".to_string(), "0.5".to_string()),
        ("FEDGE_NODE_NAME".to_string(), "not-ours".to_string()),
    ];
    let c = CoordinatorConfig::load_with_env(Some(&f), env, &[("train.epochs".into(), "2".into())]).unwrap();
    assert_eq!(c.train.momentum, 0.5);
    assert_eq!(c.rounds, 3);
    assert_eq!(c.sampling.round_deadline, Duration::from_secs(90));
    assert_eq!((c.train.learning_rate, c.train.epochs), (0.1, 2));
}

#[test]
fn the_privacy_section_builds_the_runs_privacy_state() {
    assert!(PrivacyConfig::default().privacy().is_none(), "off by default");
    let c = PrivacyConfig {
        noise: NoiseMode::Central,
        noise_multiplier: 1.5,
        clip_norm: 2.0,
        adaptive_clip: true,
        clip_count_stddev: 5.0,
        delta: 1e-6,
        epsilon_budget: 8.0,
        ..PrivacyConfig::default()
    };
    let p = c.privacy().unwrap();
    assert_eq!(
        (p.mode, p.noise_multiplier, p.clip, p.delta, p.budget),
        (NoiseMode::Central, 1.5, 2.0, 1e-6, Some(8.0))
    );
    // Adaptive clipping takes a share of the noise for its count.
    let plan = p.plan(10, 20).unwrap();
    let adaptive = plan.adaptive.unwrap();
    assert_eq!(
        (adaptive.target_quantile, adaptive.learning_rate, adaptive.count_stddev),
        (0.5, 0.2, 5.0)
    );
    assert!(plan.update_multiplier > 1.5);
    let no_budget = PrivacyConfig {
        epsilon_budget: 0.0,
        ..c
    };
    assert_eq!(no_budget.privacy().unwrap().budget, None);
}

#[test]
fn asynchronous_training_says_what_it_needs_and_what_it_refuses() {
    let mut c = CoordinatorConfig::default();
    c.security.insecure = true;
    c.asynchronous.enabled = true;
    // A fleet smaller than the buffer trains too: its nodes give a buffer
    // more than one update each when no other node could fill it.
    c.validate().unwrap();
    let settings = c.asynchronous.settings(7, Default::default()).unwrap();
    assert_eq!((settings.buffer_size, settings.first_task), (4, 7));
    assert_eq!(settings.weight.factor(3), 0.5);
    let refused = |f: &dyn Fn(&mut CoordinatorConfig)| {
        let mut c = c.clone();
        f(&mut c);
        c.validate().unwrap_err().to_string()
    };
    let e = refused(&|c| c.asynchronous.concurrency = 2);
    assert!(
        e.contains("async.concurrency (2) is below async.buffer_size (4)"),
        "{e}"
    );
    let e = refused(&|c| c.asynchronous.buffer_size = 0);
    assert_eq!(e, "invalid configuration: async: buffer_size must be at least 1");
    let e = refused(&|c| {
        c.strategy.aggregator = AggregatorName::Krum;
        c.sampling.min_nodes = 5;
        c.sampling.min_available = 5;
    });
    assert!(
        e.contains("strategy krum(f=1) needs at least 5 updates per server step; set async.buffer_size"),
        "{e}"
    );
    let e = refused(&|c| c.train.algorithm = fedge_common::task::Algorithm::Scaffold);
    assert!(e.contains("train.algorithm = \"scaffold\""), "{e}");
    let e = refused(&|c| c.train.algorithm = fedge_common::task::Algorithm::FedSgd);
    assert!(e.contains("train.max_steps = 1"), "{e}");
    let e = refused(&|c| {
        c.privacy.noise = NoiseMode::Central;
        c.strategy.max_loss_ratio = 0.0;
    });
    assert!(
        e.contains("differential privacy with asynchronous training is not available"),
        "{e}"
    );
    let e = refused(&|c| {
        c.secure_aggregation.enabled = true;
        c.sampling.min_nodes = 4;
        c.sampling.min_available = 4;
    });
    assert!(e.contains("async.enabled: secure aggregation"), "{e}");
}
