//! The bodies' schemas, to their top-level fields (camelCase, as serde writes
//! them). Nested objects are `{"type": "object"}`: open, so a field added to
//! a nested type never makes a response non-conforming; a field added at the
//! top level is caught by the test that checks live responses against these.

use serde_json::{Value, json};

fn object(required: &[&str], properties: &Value) -> Value {
    json!({"type": "object", "required": required, "properties": properties})
}

fn array(items: &Value) -> Value {
    json!({"type": "array", "items": items})
}

fn uint() -> Value {
    json!({"type": "integer", "minimum": 0})
}

fn nullable_uint() -> Value {
    json!({"type": ["integer", "null"], "minimum": 0})
}

fn string() -> Value {
    json!({"type": "string"})
}

fn any_object() -> Value {
    json!({"type": "object"})
}

fn endpoint() -> Value {
    object(
        &["id", "node", "tor", "transport", "address", "qpn"],
        &json!({
            "id": string(), "node": string(), "tor": string(),
            "transport": {"type": "integer"}, "address": string(), "qpn": uint(),
            "device": string(), "torFromAgent": {"type": "boolean"},
        }),
    )
}

/// The record's fields are in `snake_case`: `AgentRecord` has no `rename_all`
/// (its flatten into the camelCase view keeps them as they are).
fn agent() -> Value {
    object(
        &[
            "node",
            "session",
            "agent_version",
            "registered_at_ms",
            "last_seen_ms",
            "connected",
            "endpoints",
        ],
        &json!({
            "node": string(), "session": uint(), "agent_version": string(),
            "registered_at_ms": uint(), "last_seen_ms": uint(),
            "connected": {"type": "boolean"}, "endpoints": array(&endpoint()),
        }),
    )
}

fn path_stats() -> Value {
    object(
        &[
            "sourceEndpoint",
            "targetEndpoint",
            "sourceTor",
            "targetTor",
            "ok",
            "lost",
            "invalid",
        ],
        &json!({
            "sourceEndpoint": string(), "targetEndpoint": string(),
            "sourceTor": string(), "targetTor": string(),
            "ok": uint(), "lost": uint(), "invalid": uint(),
            "lossRatio": {"type": ["number", "null"]},
            "kind": {}, "softwareTimed": uint(),
            "p50NetworkRttNs": nullable_uint(), "p99NetworkRttNs": nullable_uint(),
            "lostFlowsMask": uint(), "probedFlowsMask": uint(),
            "proberP99Ns": uint(), "responderP99Ns": uint(),
            "loss": {}, "latency": {},
        }),
    )
}

/// `components.schemas`.
pub fn all() -> Value {
    json!({
        "Agents": array(&agent()),
        "Endpoints": array(&endpoint()),
        "Paths": array(&path_stats()),
        "FindingsView": object(
            &["rootCauses", "findings"],
            &json!({"rootCauses": array(&any_object()), "findings": array(&any_object())}),
        ),
        "ServicesView": object(
            &["reportingNodes", "services"],
            &json!({"reportingNodes": uint(), "services": array(&any_object())}),
        ),
        "MeshSummary": object(
            &["windowStartMs", "windowMs", "agentsRegistered", "agentsConnected",
              "pathsJudged", "excludedTargetGone", "torPairs", "rootCauses", "findings"],
            &json!({
                "windowStartMs": nullable_uint(), "windowMs": uint(),
                "agentsRegistered": uint(), "agentsConnected": uint(),
                "pathsJudged": uint(), "excludedTargetGone": uint(),
                "torPairs": array(&any_object()), "rootCauses": array(&any_object()),
                "findings": array(&any_object()),
            }),
        ),
        "HistoryIndex": object(
            &["windowMs", "maxAgeMs", "windows"],
            &json!({
                "windowMs": uint(), "maxAgeMs": uint(),
                "windows": array(&object(
                    &["startMs", "pairs", "failingLoss", "failingLatency", "pathsKept"],
                    &json!({
                        "startMs": uint(), "pairs": uint(), "failingLoss": uint(),
                        "failingLatency": uint(), "pathsKept": {"type": "boolean"},
                    }),
                )),
            }),
        ),
        "WindowMatrix": object(
            &["startMs", "windowMs", "tors", "sla", "pathsKept", "cells"],
            &json!({
                "startMs": uint(), "windowMs": uint(), "tors": array(&string()),
                "sla": any_object(), "pathsKept": {"type": "boolean"}, "cells": any_object(),
            }),
        ),
        "WindowPaths": object(
            &["startMs", "sourceTor", "targetTor", "paths"],
            &json!({
                "startMs": uint(), "sourceTor": string(), "targetTor": string(),
                "paths": array(&path_stats()),
            }),
        ),
        "OpenApi": object(
            &["openapi", "info", "paths", "components"],
            &json!({
                "openapi": string(), "info": any_object(),
                "paths": any_object(), "components": any_object(),
            }),
        ),
    })
}
