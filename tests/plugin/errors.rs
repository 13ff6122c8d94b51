//! Every bad input is an ORT error status that names the input (or attribute) and what was
//! expected; none crashes the process. Base shapes: B 1, S 4, Hq 4, Hkv 2, Dk 8, Dv 6, C 4.

use crate::common::*;
use ort::value::DynValue;
use power_retention_ort::schema::{
    decode as dcd, prefill as pf, ElemType, OpSchema, POWER_RETENTION, POWER_RETENTION_STEP,
};

const F: ElemType = ElemType::F32;

/// Port name → (dims, element type), for the inputs to feed.
type Feeds = Vec<(&'static str, Vec<usize>, ElemType)>;

fn prefill_feeds() -> Feeds {
    vec![
        ("query", vec![1, 4, 4, 8], F),
        ("key", vec![1, 4, 2, 8], F),
        ("value", vec![1, 4, 2, 6], F),
    ]
}

fn step_feeds() -> Feeds {
    vec![
        ("query", vec![1, 1, 4, 8], F),
        ("key", vec![1, 1, 2, 8], F),
        ("value", vec![1, 1, 2, 6], F),
        ("past_state", vec![1, 2, 36, 6], F),
        ("past_sum_of_keys", vec![1, 2, 36], F),
        ("past_key_cache", vec![1, 4, 2, 8], F),
        ("past_value_cache", vec![1, 4, 2, 6], F),
        ("cache_length", vec![1], ElemType::I64),
    ]
}

fn set(feeds: &mut Feeds, name: &'static str, dims: &[usize]) {
    match feeds.iter_mut().find(|f| f.0 == name) {
        Some(f) => f.1 = dims.to_vec(),
        None => feeds.push((
            name,
            dims.to_vec(),
            if name == "cache_length" {
                ElemType::I64
            } else {
                F
            },
        )),
    }
}

fn drop_feed(feeds: &mut Feeds, name: &str) {
    feeds.retain(|f| f.0 != name);
}

/// Builds the node with exactly the fed inputs wired, runs it, and returns the error text.
fn error_of(
    op: &OpSchema,
    feeds: &Feeds,
    outputs: &[usize],
    attrs: &[(&str, Attr)],
    cache_length: i64,
) -> String {
    let mut ins: Vec<Option<ElemType>> = vec![None; op.inputs.len()];
    for (name, _, t) in feeds {
        ins[op.input_index(name).expect("port")] = Some(*t);
    }
    let mut outs: Vec<Option<ElemType>> = vec![None; op.outputs.len()];
    for &o in outputs {
        outs[o] = Some(op.outputs[o].ty.resolve(F));
    }
    let model = one_node_model(op, &ins, &outs, attrs);
    let mut s = match session(&model) {
        Ok(s) => s,
        Err(e) => return e.to_string(),
    };
    let values: Vec<(&str, DynValue)> = feeds
        .iter()
        .map(|(name, dims, t)| {
            let n: usize = dims.iter().product();
            let vals = if *name == "cache_length" {
                vec![cache_length as f64; n]
            } else {
                vec![0.25; n]
            };
            (*name, Data::new(dims, vals).tensor(*t))
        })
        .collect();
    let result = s.run(values).map(|_| ());
    match result {
        Ok(()) => panic!("{}: expected an error for feeds {feeds:?}", op.name),
        Err(e) => e.to_string(),
    }
}

fn expect(msg: &str, needles: &[&str]) {
    for n in needles {
        assert!(msg.contains(n), "error message lacks {n:?}:\n{msg}");
    }
    assert!(
        !msg.contains("internal error"),
        "a bad input must not reach a panic:\n{msg}"
    );
}

const PRE_OUT: &[usize] = &[pf::OUTPUT];
const STEP_OUT: &[usize] = &[0, 1, 2, 3, 4, 6];

#[test]
fn prefill_rejects_bad_ranks_and_mismatched_dims() {
    let cases: Vec<(&str, &[usize], &[&str])> = vec![
        ("query", &[1, 4, 32], &["input 'query'", "rank 4"]),
        ("key", &[1, 4, 2, 8, 1], &["input 'key'", "rank 4"]),
        ("value", &[1, 4, 12], &["input 'value'", "rank 4"]),
        (
            "key",
            &[2, 4, 2, 8],
            &["input 'key'", "B", "'query' has B = 1"],
        ),
        ("key", &[1, 5, 2, 8], &["input 'key'", "'query' has S = 4"]),
        ("key", &[1, 4, 2, 7], &["input 'key'", "'query' has Dk = 8"]),
        ("value", &[1, 3, 2, 6], &["input 'value'", "S = 4"]),
        (
            "value",
            &[1, 4, 1, 6],
            &["input 'value'", "'key' has Hkv = 2"],
        ),
    ];
    for (name, dims, needles) in cases {
        let mut f = prefill_feeds();
        set(&mut f, name, dims);
        expect(&error_of(&POWER_RETENTION, &f, PRE_OUT, &[], 0), needles);
    }
    let mut f = prefill_feeds();
    set(&mut f, "key", &[1, 4, 3, 8]);
    set(&mut f, "value", &[1, 4, 3, 6]);
    expect(
        &error_of(&POWER_RETENTION, &f, PRE_OUT, &[], 0),
        &["Hq = 4", "Hkv = 3", "multiple"],
    );
    let mut f = prefill_feeds();
    set(&mut f, "key", &[1, 4, 0, 8]);
    set(&mut f, "value", &[1, 4, 0, 6]);
    expect(
        &error_of(&POWER_RETENTION, &f, PRE_OUT, &[], 0),
        &["input 'key'", "Hkv must be ≥ 1"],
    );
    let mut f = prefill_feeds();
    for n in ["query", "key"] {
        set(&mut f, n, &[1, 4, if n == "query" { 4 } else { 2 }, 0]);
    }
    expect(
        &error_of(&POWER_RETENTION, &f, PRE_OUT, &[], 0),
        &["Dk must be ≥ 1"],
    );
}

#[test]
fn prefill_rejects_bad_gates_and_states() {
    let mut f = prefill_feeds();
    set(&mut f, "log_gate", &[1, 4]);
    expect(
        &error_of(&POWER_RETENTION, &f, PRE_OUT, &[], 0),
        &["input 'log_gate'", "rank 3"],
    );
    let mut f = prefill_feeds();
    set(&mut f, "log_gate", &[1, 4, 4]);
    expect(
        &error_of(&POWER_RETENTION, &f, PRE_OUT, &[], 0),
        &["input 'log_gate'", "Hkv = 2"],
    );

    let mut f = prefill_feeds();
    set(&mut f, "past_state", &[1, 2, 36, 6]);
    expect(
        &error_of(&POWER_RETENTION, &f, PRE_OUT, &[], 0),
        &[
            "input 'past_sum_of_keys' is required",
            "'past_state' is given",
        ],
    );
    let mut f = prefill_feeds();
    set(&mut f, "past_sum_of_keys", &[1, 2, 36]);
    expect(
        &error_of(&POWER_RETENTION, &f, PRE_OUT, &[], 0),
        &["input 'past_state' is required"],
    );
    let mut f = prefill_feeds();
    set(&mut f, "past_state", &[1, 2, 64, 6]);
    set(&mut f, "past_sum_of_keys", &[1, 2, 36]);
    expect(
        &error_of(&POWER_RETENTION, &f, PRE_OUT, &[], 0),
        &["input 'past_state'", "D = Dk(Dk+1)/2 = 36"],
    );
    let mut f = prefill_feeds();
    set(&mut f, "past_state", &[1, 2, 36, 5]);
    set(&mut f, "past_sum_of_keys", &[1, 2, 36]);
    expect(
        &error_of(&POWER_RETENTION, &f, PRE_OUT, &[], 0),
        &["input 'past_state'", "Dv = 6"],
    );
    let mut f = prefill_feeds();
    set(&mut f, "past_state", &[1, 2, 36, 6]);
    set(&mut f, "past_sum_of_keys", &[1, 2, 35]);
    expect(
        &error_of(&POWER_RETENTION, &f, PRE_OUT, &[], 0),
        &["input 'past_sum_of_keys'", "36"],
    );
}

#[test]
fn bad_attributes_are_refused_by_name() {
    let f = prefill_feeds();
    expect(
        &error_of(&POWER_RETENTION, &f, PRE_OUT, &[("deg", Attr::Int(3))], 0),
        &["attribute 'deg'", "even"],
    );
    expect(
        &error_of(&POWER_RETENTION, &f, PRE_OUT, &[("deg", Attr::Int(0))], 0),
        &["attribute 'deg'"],
    );
    expect(
        &error_of(
            &POWER_RETENTION,
            &f,
            PRE_OUT,
            &[("chunk_size", Attr::Int(0))],
            0,
        ),
        &["attribute 'chunk_size'"],
    );
    expect(
        &error_of(
            &POWER_RETENTION,
            &f,
            PRE_OUT,
            &[("scale", Attr::Float(f32::NAN))],
            0,
        ),
        &["attribute 'scale'", "finite"],
    );
    expect(
        &error_of(
            &POWER_RETENTION,
            &f,
            PRE_OUT,
            &[("scale", Attr::Float(f32::INFINITY))],
            0,
        ),
        &["attribute 'scale'"],
    );
    expect(
        &error_of(
            &POWER_RETENTION,
            &f,
            &[pf::OUTPUT, pf::PRESENT_STATE],
            &[("deg", Attr::Int(4))],
            0,
        ),
        &["deg 4", "state"],
    );
    expect(
        &error_of(
            &POWER_RETENTION_STEP,
            &step_feeds(),
            STEP_OUT,
            &[("deg", Attr::Int(4))],
            0,
        ),
        &["deg 4", "state"],
    );
}

#[test]
fn wrong_element_types_are_refused() {
    let mut f = prefill_feeds();
    f.push(("log_gate", vec![1, 4, 2], ElemType::F16));
    expect(
        &error_of(&POWER_RETENTION, &f, PRE_OUT, &[], 0),
        &["log_gate"],
    );
    let mut f = step_feeds();
    f.retain(|x| x.0 != "cache_length");
    f.push(("cache_length", vec![1], ElemType::F32));
    expect(
        &error_of(&POWER_RETENTION_STEP, &f, STEP_OUT, &[], 0),
        &["cache_length"],
    );
}

#[test]
fn step_rejects_bad_caches_and_lengths() {
    let base = step_feeds();
    let run = |f: &Feeds, len: i64, needles: &[&str]| {
        expect(
            &error_of(&POWER_RETENTION_STEP, f, STEP_OUT, &[], len),
            needles,
        )
    };
    run(&base, 5, &["input 'cache_length'", "5", "[0, 4]"]);
    run(&base, -1, &["input 'cache_length'", "-1"]);
    let mut f = base.clone();
    set(&mut f, "cache_length", &[2]);
    run(&f, 0, &["input 'cache_length'", "B = 1"]);
    let mut f = base.clone();
    for n in ["query", "key", "value"] {
        let d = f.iter().find(|x| x.0 == n).unwrap().1.clone();
        set(&mut f, n, &[1, 5, d[2], d[3]]);
    }
    run(&f, 0, &["input 'query'", "1 ≤ S ≤ C = 4", "S = 5"]);
    let mut f = base.clone();
    set(&mut f, "past_key_cache", &[1, 4, 1, 8]);
    run(&f, 0, &["input 'past_key_cache'", "Hkv = 2"]);
    let mut f = base.clone();
    set(&mut f, "past_value_cache", &[1, 3, 2, 6]);
    run(&f, 0, &["input 'past_value_cache'", "C = 4"]);
    let mut f = base.clone();
    set(&mut f, "past_state", &[1, 2, 36, 7]);
    run(&f, 0, &["input 'past_state'", "Dv = 6"]);
    let mut f = base.clone();
    set(&mut f, "past_sum_of_keys", &[1, 1, 36]);
    run(&f, 0, &["input 'past_sum_of_keys'", "Hkv = 2"]);
    let mut f = base.clone();
    set(&mut f, "past_key_cache", &[1, 0, 2, 8]);
    set(&mut f, "past_value_cache", &[1, 0, 2, 6]);
    run(&f, 0, &["input 'past_key_cache'", "C must be ≥ 1"]);
}

#[test]
fn step_gating_inputs_go_together() {
    let mut f = step_feeds();
    set(&mut f, "log_gate", &[1, 1, 2]);
    expect(
        &error_of(&POWER_RETENTION_STEP, &f, STEP_OUT, &[], 0),
        &[
            "input 'past_log_gate_cache' is required",
            "'log_gate' is given",
        ],
    );
    let mut f = step_feeds();
    set(&mut f, "past_log_gate_cache", &[1, 4, 2]);
    expect(
        &error_of(&POWER_RETENTION_STEP, &f, STEP_OUT, &[], 0),
        &["input 'log_gate' is required"],
    );
    let f = step_feeds();
    expect(
        &error_of(&POWER_RETENTION_STEP, &f, &[0, 1, 2, 3, 4, 5, 6], &[], 0),
        &["output 'present_log_gate_cache'", "input 'log_gate'"],
    );
    let mut f = step_feeds();
    set(&mut f, "log_gate", &[1, 1, 2]);
    set(&mut f, "past_log_gate_cache", &[1, 4, 3]);
    expect(
        &error_of(&POWER_RETENTION_STEP, &f, STEP_OUT, &[], 0),
        &["input 'past_log_gate_cache'", "Hkv = 2"],
    );
    let mut f = step_feeds();
    drop_feed(&mut f, "past_state");
    // A required input left unwired is refused by ORT's graph check, which counts ports from 0.
    expect(
        &error_of(&POWER_RETENTION_STEP, &f, STEP_OUT, &[], 0),
        &["node0", "input 4"],
    );
    let _ = dcd::QUERY;
}
