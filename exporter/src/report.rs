//! Human-readable reports of what the matcher found.

use std::fmt::Write;

use crate::emit::dtype_name;
use crate::rules::{Analysis, Block};

fn opt(v: Option<i64>) -> String {
    v.map_or_else(|| "?".into(), |v| v.to_string())
}

fn cache_text(b: &Block) -> String {
    match (&b.cache.past_key, &b.cache.present_key) {
        (None, None) => "none (no KV cache I/O)".into(),
        (pk, pr) => format!(
            "past {} / {} → present {} / {}",
            pk.as_deref().unwrap_or("-"),
            b.cache.past_value.as_deref().unwrap_or("-"),
            pr.as_deref().unwrap_or("-"),
            b.cache.present_value.as_deref().unwrap_or("-"),
        ),
    }
}

pub fn render(a: &Analysis) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "attention blocks: {}", a.blocks.len());
    for (i, b) in a.blocks.iter().enumerate() {
        let _ = writeln!(s, "layer {i}: {}", b.anchor);
        let _ = writeln!(s, "  family:  {}", b.family);
        let _ = writeln!(
            s,
            "  heads:   Hq={} Hkv={}{}  Dk={} Dv={}  dtype={}",
            opt(b.heads.hq),
            opt(b.heads.hkv),
            if b.kv_repeat { " (repeat_kv)" } else { "" },
            opt(b.heads.dk),
            opt(b.heads.dv.or(b.heads.dk)),
            dtype_name(b.dtype)
        );
        let _ = writeln!(s, "  scale:   {:.6}", b.scale);
        let _ = writeln!(s, "  causal:  {}", b.causal);
        let _ = writeln!(s, "  rope:    {}", b.rope);
        let _ = writeln!(s, "  kv:      {}", cache_text(b));
        let _ = writeln!(
            s,
            "  taps:    q={} k={} v={}",
            b.q.describe(),
            b.k.describe(),
            b.v.describe()
        );
    }
    if !a.rejections.is_empty() {
        let _ = writeln!(s, "rejected candidates: {}", a.rejections.len());
        for r in &a.rejections {
            let _ = writeln!(
                s,
                "  {} [{}]: expected {}; found {}",
                r.node, r.family, r.expected, r.found
            );
        }
    }
    s
}
