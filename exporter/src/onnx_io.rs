//! Reading and writing ONNX models, external-data files and structural validation.

use std::collections::HashSet;
use std::fs;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};
use onnx_protobuf::{GraphProto, Message, ModelProto, TensorProto};

use crate::graph::is_external;

pub fn load(path: &Path) -> Result<ModelProto> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    parse(&bytes).with_context(|| format!("{} is not a valid ONNX model", path.display()))
}

pub fn parse(bytes: &[u8]) -> Result<ModelProto> {
    let model = ModelProto::parse_from_bytes(bytes).context("protobuf decoding failed")?;
    let graph = model
        .graph
        .as_ref()
        .context("the model has no graph (truncated or not an ONNX ModelProto)")?;
    if graph.node.is_empty() {
        bail!("the model's graph has no nodes (truncated or not an ONNX ModelProto)");
    }
    validate_graph(graph, &HashSet::new())?;
    Ok(model)
}

/// Every node input must be produced by an earlier node, an initializer, a graph input or an
/// enclosing graph; every graph output must be produced.
pub fn validate_graph(g: &GraphProto, outer: &HashSet<String>) -> Result<()> {
    let mut known: HashSet<String> = outer.clone();
    known.extend(g.input.iter().map(|v| v.name.clone()));
    known.extend(g.initializer.iter().map(|t| t.name.clone()));
    known.extend(
        g.sparse_initializer
            .iter()
            .filter_map(|s| s.values.as_ref().map(|v| v.name.clone())),
    );
    let produced: HashSet<&str> = g
        .node
        .iter()
        .flat_map(|n| n.output.iter().map(|s| s.as_str()))
        .collect();
    for n in &g.node {
        for i in &n.input {
            if !i.is_empty() && !known.contains(i) {
                let what = if produced.contains(i.as_str()) {
                    "is produced only later (graph not topologically sorted)"
                } else {
                    "is not produced by any node, initializer or graph input (dangling edge or missing initializer)"
                };
                bail!("node '{}' ({}) input '{i}' {what}", n.name, n.op_type);
            }
        }
        for a in &n.attribute {
            for sub in a.g.as_ref().into_iter().chain(a.graphs.iter()) {
                validate_graph(sub, &known)
                    .with_context(|| format!("in a subgraph of node '{}'", n.name))?;
            }
        }
        known.extend(n.output.iter().filter(|o| !o.is_empty()).cloned());
    }
    for o in &g.output {
        if !known.contains(&o.name) {
            bail!("graph output '{}' is not produced by any node", o.name);
        }
    }
    Ok(())
}

pub fn save(model: &ModelProto, path: &Path) -> Result<()> {
    let bytes = model
        .write_to_bytes()
        .with_context(|| format!("serialising {}", path.display()))?;
    fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// External-data files the model references, relative to its directory.
pub fn external_files(model: &ModelProto) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    if let Some(g) = model.graph.as_ref() {
        collect_external(g, &mut files)?;
    }
    files.sort();
    files.dedup();
    Ok(files)
}

fn collect_external(g: &GraphProto, files: &mut Vec<PathBuf>) -> Result<()> {
    let tensors = g.initializer.iter().chain(g.node.iter().flat_map(|n| {
        n.attribute
            .iter()
            .filter_map(|a| a.t.as_ref())
            .collect::<Vec<&TensorProto>>()
    }));
    for t in tensors.filter(|t| is_external(t)) {
        let loc = t
            .external_data
            .iter()
            .find(|e| e.key == "location")
            .with_context(|| format!("external tensor '{}' has no location", t.name))?;
        let p = PathBuf::from(&loc.value);
        if p.is_absolute() || p.components().any(|c| matches!(c, Component::ParentDir)) {
            bail!(
                "external data location '{}' of '{}' leaves the model's directory",
                loc.value,
                t.name
            );
        }
        files.push(p);
    }
    for n in &g.node {
        for a in &n.attribute {
            for sub in a.g.as_ref().into_iter().chain(a.graphs.iter()) {
                collect_external(sub, files)?;
            }
        }
    }
    Ok(())
}

/// Copies external-data files next to the written models so their relative locations stay valid.
pub fn copy_external(files: &[PathBuf], from: &Path, to: &Path) -> Result<()> {
    for f in files {
        let src = from.join(f);
        let dst = to.join(f);
        let src_real = src.canonicalize().with_context(|| {
            format!(
                "copying external data {}: the file is missing",
                src.display()
            )
        })?;
        if dst.canonicalize().is_ok_and(|d| d == src_real) {
            continue;
        }
        if let Some(parent) = dst.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::copy(&src, &dst).with_context(|| {
            format!(
                "copying external data {} to {}",
                src.display(),
                dst.display()
            )
        })?;
    }
    Ok(())
}
