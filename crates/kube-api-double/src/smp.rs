//! Strategic merge patch (`application/strategic-merge-patch+json`) as
//! apimachinery's `strategicpatch` applies it on the server
//! (`StrategicMergeMapPatch` with parallel lists merged and unmatched
//! nulls ignored):
//!
//! - maps merge key by key, `null` deletes a key;
//! - lists are replaced, except those the schema gives a merge strategy:
//!   lists of maps merge element by element on their merge key (`type` for
//!   Node conditions and addresses), lists of scalars merge as sets;
//! - directives: `$patch: replace|delete` (in a map or as a list element),
//!   `$retainKeys`, `$setElementOrder/<list>`, `$deleteFromPrimitiveList/<list>`;
//! - the order of a merged list: the patch's (or `$setElementOrder`'s) order
//!   for the patched items, the server's order for the others, interleaved
//!   the way apimachinery interleaves them (patched items that the server
//!   did not have come first).

use serde_json::{Map, Value};

const DIRECTIVE: &str = "$patch";
const RETAIN_KEYS: &str = "$retainKeys";
const SET_ORDER_PREFIX: &str = "$setElementOrder/";
const DELETE_PRIMITIVE_PREFIX: &str = "$deleteFromPrimitiveList/";

/// The merge strategy of a list field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListMerge {
    /// A set of scalars (`metadata.finalizers`, `spec.podCIDRs`).
    Scalars,
    /// Maps merged on this key (`status.conditions` on `type`).
    ByKey(&'static str),
}

/// The schema: the merge strategy of the list at a dotted field path
/// (`status.conditions`); `None` means the list is replaced.
pub type Schema = fn(&str) -> Option<ListMerge>;

/// Why a patch could not be applied, with the HTTP class kube-apiserver
/// answers it with.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SmpError {
    /// A malformed patch directive (400).
    #[error("{0}")]
    BadRequest(String),
    /// A list of lists (422).
    #[error("{0}")]
    Unprocessable(String),
    /// Anything else apimachinery returns as a plain error (500).
    #[error("{0}")]
    Internal(String),
}

/// Applies `patch` to `original` (both JSON objects).
pub fn strategic_merge(original: Value, patch: Value, schema: Schema) -> Result<Value, SmpError> {
    let Value::Object(patch) = patch else {
        return Err(SmpError::BadRequest(format!(
            "json: cannot unmarshal {} into Go value of type map[string]interface {{}}",
            json_type(&patch)
        )));
    };
    let original = match original {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    let merged = Merger { schema }.merge_map(original, patch, "")?;
    Ok(Value::Object(merged))
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn child(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Go's `%v` of a decoded JSON value (for error messages).
pub fn go_value(v: &Value) -> String {
    match v {
        Value::Null => "<nil>".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        Value::Array(a) => format!("[{}]", a.iter().map(go_value).collect::<Vec<_>>().join(" ")),
        Value::Object(m) => format!(
            "map[{}]",
            m.iter()
                .map(|(k, v)| format!("{k}:{}", go_value(v)))
                .collect::<Vec<_>>()
                .join(" ")
        ),
    }
}

fn no_merge_key(m: &Map<String, Value>, key: &str) -> SmpError {
    SmpError::Internal(format!(
        "map: {} does not contain declared merge key: {key}",
        go_value(&Value::Object(m.clone()))
    ))
}

fn bad_patch_type(t: &Value, m: &Map<String, Value>) -> SmpError {
    SmpError::Internal(format!(
        "unknown patch type: {} in map: {}",
        go_value(t),
        go_value(&Value::Object(m.clone()))
    ))
}

/// Whether two list items are "the same" for ordering and matching: by
/// merge key for maps, by value for scalars.
fn same_item(a: &Value, b: &Value, key: Option<&str>) -> bool {
    match key {
        Some(k) => match (a.get(k), b.get(k)) {
            (Some(x), Some(y)) => x == y,
            _ => false,
        },
        None => a == b,
    }
}

fn index_in(list: &[Value], item: &Value, key: Option<&str>) -> Option<usize> {
    list.iter().position(|x| same_item(x, item, key))
}

/// Removes directive keys and nulls: what decoding into the typed object
/// leaves of a patch value taken as is.
fn clean(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .filter(|(k, v)| !k.starts_with('$') && !v.is_null())
                .map(|(k, v)| (k, clean(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(
            a.into_iter()
                .filter(|e| e.get(DIRECTIVE).is_none())
                .map(clean)
                .collect(),
        ),
        other => other,
    }
}

struct Merger {
    schema: Schema,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ElemKind {
    Map,
    Scalar,
}

impl Merger {
    fn list_merge(&self, path: &str) -> Option<ListMerge> {
        (self.schema)(path)
    }

    /// A patch value for a key the original lacks: merged into an empty
    /// value of its type, so that directives and nulls inside it act.
    fn fresh(&self, v: Value, path: &str) -> Result<Value, SmpError> {
        match v {
            Value::Object(m) => Ok(Value::Object(self.merge_map(Map::new(), m, path)?)),
            Value::Array(a) => match self.list_merge(path) {
                Some(strategy) => Ok(Value::Array(self.merge_slice(
                    Vec::new(),
                    a,
                    strategy,
                    false,
                    path,
                )?)),
                None => Ok(clean(Value::Array(a))),
            },
            other => Ok(other),
        }
    }

    fn merge_map(
        &self,
        mut original: Map<String, Value>,
        mut patch: Map<String, Value>,
        path: &str,
    ) -> Result<Map<String, Value>, SmpError> {
        if let Some(d) = patch.get(DIRECTIVE).cloned() {
            return match d.as_str() {
                Some("replace") => {
                    patch.remove(DIRECTIVE);
                    match clean(Value::Object(patch)) {
                        Value::Object(m) => Ok(m),
                        _ => unreachable!("clean keeps objects"),
                    }
                }
                Some("delete") => Ok(Map::new()),
                _ => Err(bad_patch_type(&d, &patch)),
            };
        }

        self.retain_keys(&mut original, &mut patch)?;
        self.set_element_orders(&mut original, &mut patch, path)?;

        for (k, patch_v) in patch {
            let (key, delete_list) = match k.strip_prefix(DELETE_PRIMITIVE_PREFIX) {
                Some(rest) => (rest.to_string(), true),
                None => (k, false),
            };
            if key.starts_with('$') {
                // Unknown directives are dropped by the typed decode.
                continue;
            }
            let key_path = child(path, &key);
            if patch_v.is_null() {
                original.remove(&key);
                continue;
            }
            let Some(orig_v) = original.remove(&key) else {
                if !delete_list {
                    original.insert(key, self.fresh(patch_v, &key_path)?);
                }
                continue;
            };
            let merged = match (orig_v, patch_v) {
                (Value::Object(o), Value::Object(p)) => {
                    Value::Object(self.merge_map(o, p, &key_path)?)
                }
                (Value::Array(o), Value::Array(p)) => match self.list_merge(&key_path) {
                    Some(strategy) => {
                        Value::Array(self.merge_slice(o, p, strategy, delete_list, &key_path)?)
                    }
                    None => clean(Value::Array(p)),
                },
                (_, p) => self.fresh(p, &key_path)?,
            };
            original.insert(key, merged);
        }
        Ok(original)
    }

    fn retain_keys(
        &self,
        original: &mut Map<String, Value>,
        patch: &mut Map<String, Value>,
    ) -> Result<(), SmpError> {
        let Some(retain) = patch.remove(RETAIN_KEYS) else {
            return Ok(());
        };
        let bad = || SmpError::BadRequest("invalid patch format of retainKeys".into());
        let Value::Array(list) = retain else {
            return Err(bad());
        };
        for (k, v) in patch.iter() {
            if v.is_null()
                || k.starts_with(DELETE_PRIMITIVE_PREFIX)
                || k.starts_with(SET_ORDER_PREFIX)
            {
                continue;
            }
            if !list.iter().any(|x| x.as_str() == Some(k.as_str())) {
                return Err(bad());
            }
        }
        original.retain(|k, _| list.iter().any(|x| x.as_str() == Some(k.as_str())));
        Ok(())
    }

    /// `$setElementOrder/<list>`: merges that list (with its patch, if
    /// any) now and puts it in the requested order.
    fn set_element_orders(
        &self,
        original: &mut Map<String, Value>,
        patch: &mut Map<String, Value>,
        path: &str,
    ) -> Result<(), SmpError> {
        let keys: Vec<String> = patch
            .keys()
            .filter(|k| k.starts_with(SET_ORDER_PREFIX))
            .cloned()
            .collect();
        for k in keys {
            let order = patch.remove(&k).expect("key listed above");
            let bad =
                || SmpError::BadRequest("invalid patch format of setElementOrder list".into());
            let Value::Array(order) = order else {
                return Err(bad());
            };
            let list_key = &k[SET_ORDER_PREFIX.len()..];
            if list_key.is_empty() {
                return Err(bad());
            }
            let key_path = child(path, list_key);
            let strategy = self.list_merge(&key_path);
            let merge_key = match strategy {
                Some(ListMerge::ByKey(mk)) => Some(mk),
                _ => None,
            };
            let orig_list = match original.get(list_key) {
                Some(Value::Array(a)) => Some(a.clone()),
                Some(other) => {
                    return Err(SmpError::Internal(format!(
                        "expected []interface{{}}, but got {}",
                        go_value(other)
                    )))
                }
                None => None,
            };
            let patch_list = match patch.get(list_key) {
                Some(Value::Array(a)) => Some(a.clone()),
                Some(Value::Null) | None => None,
                Some(other) => {
                    return Err(SmpError::Internal(format!(
                        "expected []interface{{}}, but got {}",
                        go_value(other)
                    )))
                }
            };
            if let Some(p) = &patch_list {
                check_order(p, &order, merge_key)?;
            }
            let merged = match (&orig_list, patch_list) {
                (Some(o), None) => o.clone(),
                (None, Some(p)) => match self.fresh(Value::Array(p), &key_path)? {
                    Value::Array(a) => a,
                    _ => unreachable!("fresh keeps arrays"),
                },
                (Some(o), Some(p)) => match strategy {
                    Some(s) => self.merge_slice(o.clone(), p, s, false, &key_path)?,
                    None => match clean(Value::Array(p)) {
                        Value::Array(a) => a,
                        _ => unreachable!("clean keeps arrays"),
                    },
                },
                (None, None) => continue,
            };
            let server_order = orig_list.unwrap_or_default();
            let (in_order, server_only): (Vec<Value>, Vec<Value>) = merged
                .into_iter()
                .partition(|item| index_in(&order, item, merge_key).is_some());
            let result = normalize_order(in_order, server_only, &order, &server_order, merge_key);
            original.insert(list_key.to_string(), Value::Array(result));
            patch.remove(list_key);
        }
        Ok(())
    }

    fn merge_slice(
        &self,
        original: Vec<Value>,
        patch: Vec<Value>,
        strategy: ListMerge,
        delete_list: bool,
        path: &str,
    ) -> Result<Vec<Value>, SmpError> {
        if original.is_empty() && patch.is_empty() {
            return Ok(original);
        }
        let kind = element_kind(&original, &patch)?;
        match kind {
            ElemKind::Scalar => {
                if delete_list {
                    return Ok(original
                        .into_iter()
                        .filter(|v| !patch.contains(v))
                        .collect());
                }
                let mut merged = original.clone();
                for v in &patch {
                    if !merged.contains(v) {
                        merged.push(v.clone());
                    }
                }
                let (patched, server_only): (Vec<Value>, Vec<Value>) =
                    merged.into_iter().partition(|v| patch.contains(v));
                Ok(normalize_order(
                    patched,
                    server_only,
                    &patch,
                    &original,
                    None,
                ))
            }
            ElemKind::Map => {
                let key = match strategy {
                    ListMerge::ByKey(k) => k,
                    ListMerge::Scalars => {
                        return Err(SmpError::Internal(
                            "cannot merge lists without merge key for type map".into(),
                        ))
                    }
                };
                let (original, patch) = special_elements(original, patch, key)?;
                let mut merged = original.clone();
                for item in &patch {
                    let Value::Object(pm) = item else {
                        unreachable!("element kind checked");
                    };
                    let Some(kv) = pm.get(key) else {
                        return Err(no_merge_key(pm, key));
                    };
                    let found = merged.iter().position(|o| o.get(key) == Some(kv));
                    match found {
                        Some(i) => {
                            let Value::Object(om) = std::mem::take(&mut merged[i]) else {
                                return Err(SmpError::Internal(format!(
                                    "value for key {i} is not a map."
                                )));
                            };
                            merged[i] = Value::Object(self.merge_map(om, pm.clone(), path)?);
                        }
                        None => merged.push(self.fresh(item.clone(), path)?),
                    }
                }
                let (patched, server_only): (Vec<Value>, Vec<Value>) = merged
                    .into_iter()
                    .partition(|v| index_in(&patch, v, Some(key)).is_some());
                Ok(normalize_order(
                    patched,
                    server_only,
                    &patch,
                    &original,
                    Some(key),
                ))
            }
        }
    }
}

fn element_kind(a: &[Value], b: &[Value]) -> Result<ElemKind, SmpError> {
    let mut kind = None;
    for v in a.iter().chain(b.iter()) {
        let k = match v {
            Value::Array(_) => {
                return Err(SmpError::Unprocessable(
                    "lists of lists are not supported".into(),
                ))
            }
            Value::Object(_) => ElemKind::Map,
            _ => ElemKind::Scalar,
        };
        match kind {
            None => kind = Some(k),
            Some(prev) if prev != k => {
                return Err(SmpError::Internal(format!(
                    "list element types are not identical: [{} {}]",
                    go_value(&Value::Array(a.to_vec())),
                    go_value(&Value::Array(b.to_vec()))
                )))
            }
            _ => {}
        }
    }
    kind.ok_or_else(|| SmpError::Internal("no elements in any of the given slices".into()))
}

/// `$patch` elements of a merging list of maps: `delete` removes the
/// server's items with that key, `replace` makes the rest of the patch the
/// whole list. Returns the new original and the patch without them.
fn special_elements(
    mut original: Vec<Value>,
    patch: Vec<Value>,
    key: &str,
) -> Result<(Vec<Value>, Vec<Value>), SmpError> {
    let mut rest = Vec::new();
    let mut replace = false;
    for item in patch {
        let Value::Object(m) = &item else {
            unreachable!("element kind checked");
        };
        match m.get(DIRECTIVE) {
            None => rest.push(item),
            Some(d) => match d.as_str() {
                Some("delete") => {
                    let Some(kv) = m.get(key) else {
                        return Err(no_merge_key(m, key));
                    };
                    original.retain(|o| o.get(key) != Some(kv));
                }
                Some("replace") => replace = true,
                Some("merge") => {
                    return Err(SmpError::Internal(
                        "merging lists cannot yet be specified in the patch".into(),
                    ))
                }
                _ => return Err(bad_patch_type(d, m)),
            },
        }
    }
    if replace {
        let replaced = rest.into_iter().map(clean).collect();
        return Ok((replaced, Vec::new()));
    }
    Ok((original, rest))
}

/// Checks that the patch list's items appear in `$setElementOrder` in the
/// same relative order.
fn check_order(patch: &[Value], order: &[Value], key: Option<&str>) -> Result<(), SmpError> {
    if patch.is_empty() || order.is_empty() {
        return Ok(());
    }
    let items: Vec<&Value> = patch
        .iter()
        .filter(|v| v.get(DIRECTIVE).is_none())
        .collect();
    let (mut pi, mut oi) = (0, 0);
    while pi < items.len() && oi < order.len() {
        if same_item(items[pi], &order[oi], key) {
            pi += 1;
        }
        oi += 1;
    }
    if pi < items.len() {
        return Err(SmpError::Internal(format!(
            "The order in patch list:\n{}\n doesn't match $setElementOrder list:\n{}\n",
            go_value(&Value::Array(patch.to_vec())),
            go_value(&Value::Array(order.to_vec()))
        )));
    }
    Ok(())
}

/// Sorts the patched items by `patch_order` and interleaves the
/// server-only items (kept in `server_order`) into them: a server item goes
/// before a patched item only when both are known to the server and the
/// server has it first.
fn normalize_order(
    mut patched: Vec<Value>,
    server_only: Vec<Value>,
    patch_order: &[Value],
    server_order: &[Value],
    key: Option<&str>,
) -> Vec<Value> {
    patched.sort_by_key(|v| index_in(patch_order, v, key).unwrap_or(usize::MAX));
    let mut out = Vec::with_capacity(patched.len() + server_only.len());
    let mut left = server_only.into_iter().peekable();
    let mut right = patched.into_iter().peekable();
    loop {
        match (left.peek(), right.peek()) {
            (None, None) => break,
            (Some(_), None) => out.push(left.next().expect("peeked")),
            (None, Some(_)) => out.push(right.next().expect("peeked")),
            (Some(l), Some(r)) => {
                let li = index_in(server_order, l, key);
                let ri = index_in(server_order, r, key);
                let server_first = matches!((li, ri), (Some(a), Some(b)) if a < b);
                if server_first {
                    out.push(left.next().expect("peeked"));
                } else {
                    out.push(right.next().expect("peeked"));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node_schema(path: &str) -> Option<ListMerge> {
        match path {
            "metadata.finalizers" | "spec.podCIDRs" => Some(ListMerge::Scalars),
            "metadata.ownerReferences" => Some(ListMerge::ByKey("uid")),
            "status.conditions" | "status.addresses" => Some(ListMerge::ByKey("type")),
            _ => None,
        }
    }

    fn smp(orig: Value, patch: Value) -> Value {
        strategic_merge(orig, patch, node_schema).unwrap()
    }

    #[test]
    fn maps_merge_and_null_deletes() {
        let out = smp(
            json!({"metadata": {"annotations": {"a": "1", "b": "2"}, "name": "n"}}),
            json!({"metadata": {"annotations": {"a": null, "c": "3"}}}),
        );
        assert_eq!(
            out,
            json!({"metadata": {"annotations": {"b": "2", "c": "3"}, "name": "n"}})
        );
        // A null for a key the original lacks leaves nothing behind.
        let out = smp(
            json!({"metadata": {}}),
            json!({"metadata": {"labels": {"x": null}}}),
        );
        assert_eq!(out, json!({"metadata": {"labels": {}}}));
    }

    #[test]
    fn conditions_merge_by_type() {
        let orig = json!({"status": {"conditions": [
            {"type": "Ready", "status": "True"},
            {"type": "NetworkUnavailable", "status": "True", "reason": "NoRouteCreated"},
        ]}});
        let out = smp(
            orig,
            json!({"status": {"conditions": [
                {"type": "NetworkUnavailable", "status": "False", "reason": "FlannelIsUp"}
            ]}}),
        );
        assert_eq!(
            out,
            json!({"status": {"conditions": [
                {"type": "Ready", "status": "True"},
                {"type": "NetworkUnavailable", "status": "False", "reason": "FlannelIsUp"},
            ]}})
        );
    }

    #[test]
    fn new_list_items_go_first_like_apimachinery() {
        let out = smp(
            json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
            json!({"status": {"conditions": [{"type": "NetworkUnavailable", "status": "False"}]}}),
        );
        assert_eq!(
            out["status"]["conditions"],
            json!([{"type": "NetworkUnavailable", "status": "False"}, {"type": "Ready", "status": "True"}])
        );
    }

    #[test]
    fn unlisted_lists_are_replaced() {
        let out = smp(
            json!({"spec": {"taints": [{"key": "a", "effect": "NoSchedule"}]}}),
            json!({"spec": {"taints": [{"key": "b", "effect": "NoExecute"}]}}),
        );
        assert_eq!(
            out,
            json!({"spec": {"taints": [{"key": "b", "effect": "NoExecute"}]}})
        );
    }

    #[test]
    fn scalar_sets_and_delete_from_primitive_list() {
        let out = smp(
            json!({"metadata": {"finalizers": ["a", "b"]}}),
            json!({"metadata": {"finalizers": ["c"], "$deleteFromPrimitiveList/finalizers": ["a"]}}),
        );
        // The directive sorts after the list key, so the union comes first.
        let f = out["metadata"]["finalizers"].as_array().unwrap().clone();
        assert!(f.contains(&json!("b")) && f.contains(&json!("c")) && !f.contains(&json!("a")));
    }

    #[test]
    fn set_element_order_is_accepted_and_applied() {
        // What client-go's two-way merge sends when it changes one condition.
        let orig = json!({"status": {"conditions": [
            {"type": "A", "status": "True"},
            {"type": "B", "status": "True"},
        ]}});
        let out = smp(
            orig,
            json!({"status": {
                "$setElementOrder/conditions": [{"type": "B"}, {"type": "A"}],
                "conditions": [{"type": "A", "status": "False"}]
            }}),
        );
        assert_eq!(
            out["status"]["conditions"],
            json!([{"type": "B", "status": "True"}, {"type": "A", "status": "False"}])
        );
    }

    #[test]
    fn patch_directives() {
        let out = smp(
            json!({"status": {"addresses": [
                {"type": "InternalIP", "address": "1.1.1.1"},
                {"type": "Hostname", "address": "h"},
            ]}}),
            json!({"status": {"addresses": [{"type": "Hostname", "$patch": "delete"}]}}),
        );
        assert_eq!(
            out["status"]["addresses"],
            json!([{"type": "InternalIP", "address": "1.1.1.1"}])
        );
        let out = smp(
            json!({"status": {"addresses": [{"type": "InternalIP", "address": "1.1.1.1"}]}}),
            json!({"status": {"addresses": [{"$patch": "replace"}, {"type": "Hostname", "address": "h"}]}}),
        );
        assert_eq!(
            out["status"]["addresses"],
            json!([{"type": "Hostname", "address": "h"}])
        );
        let out = smp(
            json!({"metadata": {"labels": {"a": "1"}}}),
            json!({"metadata": {"labels": {"$patch": "replace", "b": "2"}}}),
        );
        assert_eq!(out["metadata"]["labels"], json!({"b": "2"}));
        let out = smp(
            json!({"spec": {"a": 1, "b": 2, "c": 3}}),
            json!({"spec": {"$retainKeys": ["a", "d"], "d": 4}}),
        );
        assert_eq!(out["spec"], json!({"a": 1, "d": 4}));
    }

    #[test]
    fn errors() {
        let e = strategic_merge(
            json!({"status": {"conditions": [{"type": "A"}]}}),
            json!({"status": {"conditions": [{"status": "x"}]}}),
            node_schema,
        )
        .unwrap_err();
        assert_eq!(
            e,
            SmpError::Internal(
                "map: map[status:x] does not contain declared merge key: type".into()
            )
        );
        assert!(matches!(
            strategic_merge(json!({}), json!([1]), node_schema),
            Err(SmpError::BadRequest(_))
        ));
        assert!(matches!(
            strategic_merge(
                json!({"spec": {}}),
                json!({"spec": {"$retainKeys": "x"}}),
                node_schema
            ),
            Err(SmpError::BadRequest(_))
        ));
    }
}
