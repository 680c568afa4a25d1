//! Label selectors (`labelSelector`: `k=v`, `k==v`, `k!=v`, `k`, `!k`,
//! `k in (a,b)`, `k notin (a,b)`, comma-AND) and field selectors
//! (`fieldSelector`: `f=v`, `f==v`, `f!=v`, comma-AND), parsed and matched
//! as apimachinery's `labels` and `fields` packages do.

use serde_json::{Map, Value};

use crate::resources::Kind;
use crate::validation;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Eq,
    NotEq,
    In,
    NotIn,
    Exists,
    NotExists,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Requirement {
    key: String,
    op: Op,
    values: Vec<String>,
}

/// A parsed label selector; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<Requirement>);

/// Splits on commas outside parentheses.
fn split_top(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut depth = 0;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn check_key(key: &str) -> Result<(), String> {
    let errs = validation::qualified_name(key);
    if errs.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "unable to parse requirement: key: Invalid value: {key:?}: {}",
            errs.join("; ")
        ))
    }
}

fn check_value(v: &str) -> Result<(), String> {
    let errs = validation::label_value(v);
    if errs.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "unable to parse requirement: values[0]: Invalid value: {v:?}: {}",
            errs.join("; ")
        ))
    }
}

fn parse_set(rest: &str) -> Result<Vec<String>, String> {
    let rest = rest.trim();
    let inner = rest
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| format!("unable to parse requirement: found '{rest}', expected: '('"))?;
    let values: Vec<String> = inner
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect();
    for v in &values {
        check_value(v)?;
    }
    Ok(values)
}

impl LabelSelector {
    /// Parses `labelSelector`; the error is the 400 message.
    pub fn parse(s: &str) -> Result<LabelSelector, String> {
        let mut reqs = Vec::new();
        if s.trim().is_empty() {
            return Ok(LabelSelector(reqs));
        }
        for part in split_top(s) {
            let part = part.trim();
            if part.is_empty() {
                return Err("found '', expected: !, identifier, or 'end of string'".into());
            }
            let req = if let Some(key) = part.strip_prefix('!') {
                let key = key.trim();
                check_key(key)?;
                Requirement {
                    key: key.into(),
                    op: Op::NotExists,
                    values: vec![],
                }
            } else if let Some((k, v)) = part.split_once("!=") {
                Requirement {
                    key: k.trim().into(),
                    op: Op::NotEq,
                    values: vec![v.trim().into()],
                }
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                Requirement {
                    key: k.trim().into(),
                    op: Op::Eq,
                    values: vec![v.trim().into()],
                }
            } else if let Some((k, rest)) = part.split_once(" notin ") {
                Requirement {
                    key: k.trim().into(),
                    op: Op::NotIn,
                    values: parse_set(rest)?,
                }
            } else if let Some((k, rest)) = part.split_once(" in ") {
                Requirement {
                    key: k.trim().into(),
                    op: Op::In,
                    values: parse_set(rest)?,
                }
            } else if part.contains(char::is_whitespace) {
                return Err(format!(
                    "unable to parse requirement: found '{}', expected: in, notin, =, ==, !=, gt, lt",
                    part.split_whitespace().nth(1).unwrap_or("")
                ));
            } else {
                Requirement {
                    key: part.into(),
                    op: Op::Exists,
                    values: vec![],
                }
            };
            check_key(&req.key)?;
            if matches!(req.op, Op::Eq | Op::NotEq) {
                check_value(&req.values[0])?;
            }
            reqs.push(req);
        }
        Ok(LabelSelector(reqs))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether an object with these labels matches.
    pub fn matches(&self, labels: Option<&Map<String, Value>>) -> bool {
        self.0.iter().all(|r| {
            let v = labels.and_then(|l| l.get(&r.key)).and_then(Value::as_str);
            match r.op {
                Op::Eq => v == Some(r.values[0].as_str()),
                Op::NotEq => v != Some(r.values[0].as_str()),
                Op::In => v.is_some_and(|v| r.values.iter().any(|x| x == v)),
                Op::NotIn => v.is_none_or(|v| !r.values.iter().any(|x| x == v)),
                Op::Exists => v.is_some(),
                Op::NotExists => v.is_none(),
            }
        })
    }
}

/// A parsed field selector.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

/// Splits on unescaped commas and unescapes `\,` `\=` `\\`.
fn split_escaped(s: &str, sep: char) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            cur.push(c);
            if let Some(n) = chars.next() {
                cur.push(n);
            }
        } else if c == sep {
            out.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    out.push(cur);
    out
}

fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl FieldSelector {
    /// Parses `fieldSelector` and checks its labels against the resource.
    pub fn parse(s: &str, kind: Kind) -> Result<FieldSelector, String> {
        let mut terms = Vec::new();
        if s.trim().is_empty() {
            return Ok(FieldSelector(terms));
        }
        for part in split_escaped(s, ',') {
            let (field, eq, value) = if let Some((f, v)) = part.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = part.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = part.split_once('=') {
                (f, true, v)
            } else {
                return Err(format!(
                    "invalid selector: '{s}'; can't understand '{part}'"
                ));
            };
            let field = field.trim().to_string();
            if kind.field_label(&Value::Null, &field).is_none() {
                return Err(format!("field label not supported: {field}"));
            }
            terms.push((field, eq, unescape(value)));
        }
        Ok(FieldSelector(terms))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn matches(&self, kind: Kind, obj: &Value) -> bool {
        self.0.iter().all(|(field, eq, value)| {
            let actual = kind.field_label(obj, field).unwrap_or_default();
            (actual == *value) == *eq
        })
    }
}

/// Label and field selector together.
#[derive(Debug, Clone, Default)]
pub struct Selector {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Selector {
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty() && self.fields.is_empty()
    }

    pub fn matches(&self, kind: Kind, obj: &Value) -> bool {
        self.labels
            .matches(obj.pointer("/metadata/labels").and_then(Value::as_object))
            && self.fields.matches(kind, obj)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn labels(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn equality_and_sets() {
        let l = labels(json!({"a": "1", "b": "2"}));
        let m = |s: &str| LabelSelector::parse(s).unwrap().matches(Some(&l));
        assert!(m(""));
        assert!(m("a=1"));
        assert!(m("a==1,b=2"));
        assert!(!m("a=1,b=3"));
        assert!(m("a!=2"));
        assert!(m("c!=2"), "!= matches an absent label");
        assert!(m("a"));
        assert!(!m("c"));
        assert!(m("!c"));
        assert!(m("a in (1,3)"));
        assert!(!m("a notin (1,3)"));
        assert!(m("c notin (1)"));
        assert!(LabelSelector::parse("a b").is_err());
        assert!(LabelSelector::parse("bad key=1").is_err());
        assert!(LabelSelector::parse("a=bad value").is_err());
        assert!(!LabelSelector::parse("a=1").unwrap().matches(None));
    }

    #[test]
    fn fields() {
        let n = json!({"metadata": {"name": "k8s-node1"}});
        let f = FieldSelector::parse("metadata.name=k8s-node1", Kind::Node).unwrap();
        assert!(f.matches(Kind::Node, &n));
        let f = FieldSelector::parse("metadata.name!=k8s-node1", Kind::Node).unwrap();
        assert!(!f.matches(Kind::Node, &n));
        let f = FieldSelector::parse("spec.unschedulable=false", Kind::Node).unwrap();
        assert!(f.matches(Kind::Node, &n));
        assert_eq!(
            FieldSelector::parse("spec.podCIDR=x", Kind::Node),
            Err("field label not supported: spec.podCIDR".into())
        );
        assert!(FieldSelector::parse("spec.nodeName=n", Kind::Pod).is_ok());
    }
}
