//! Topic filter matching ([MQTT-4.7]): one filter against one topic, and a trie of the
//! filters of every persistent session, so that finding who must keep a copy of a publish
//! costs one walk down the topic's levels, not one comparison per filter.

use std::collections::HashMap;

/// Whether `filter` matches `topic` (both valid). A filter starting with a wildcard never
/// matches a topic starting with `$` ([MQTT-4.7.2-1]); `a/#` matches `a` too.
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut t = topic.split('/');
    for f in filter.split('/') {
        match f {
            "#" => return true,
            "+" => {
                if t.next().is_none() {
                    return false;
                }
            }
            level => match t.next() {
                Some(l) if l == level => {}
                _ => return false,
            },
        }
    }
    t.next().is_none()
}

#[derive(Default, Debug)]
struct Node {
    children: HashMap<String, Node>,
    plus: Option<Box<Node>>,
    /// Sessions whose filter ends here, with the filter's QoS.
    here: HashMap<String, u8>,
    /// Sessions with `<this level>/#`.
    hash: HashMap<String, u8>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty()
            && self.plus.is_none()
            && self.here.is_empty()
            && self.hash.is_empty()
    }
}

/// Filters of many sessions; `matches` gives each session that must receive a topic once,
/// with the highest QoS of its matching filters.
#[derive(Default, Debug)]
pub struct Matcher {
    root: Node,
    filters: usize,
}

impl Matcher {
    pub fn is_empty(&self) -> bool {
        self.filters == 0
    }

    pub fn insert(&mut self, filter: &str, session: &str, qos: u8) {
        let mut node = &mut self.root;
        let mut levels = filter.split('/').peekable();
        while let Some(level) = levels.next() {
            if level == "#" {
                if node.hash.insert(session.to_string(), qos).is_none() {
                    self.filters += 1;
                }
                return;
            }
            node = if level == "+" {
                node.plus.get_or_insert_with(Default::default)
            } else {
                node.children.entry(level.to_string()).or_default()
            };
            if levels.peek().is_none() && node.here.insert(session.to_string(), qos).is_none() {
                self.filters += 1;
            }
        }
    }

    pub fn remove(&mut self, filter: &str, session: &str) {
        let levels: Vec<&str> = filter.split('/').collect();
        if remove_at(&mut self.root, &levels, session) {
            self.filters -= 1;
        }
    }

    /// Every session with a filter matching `topic`, with its highest matching QoS.
    pub fn matches(&self, topic: &str) -> HashMap<String, u8> {
        let mut out = HashMap::new();
        let levels: Vec<&str> = topic.split('/').collect();
        let dollar = topic.starts_with('$');
        walk(&self.root, &levels, !dollar, &mut out);
        out
    }
}

fn merge(out: &mut HashMap<String, u8>, from: &HashMap<String, u8>) {
    for (s, q) in from {
        let e = out.entry(s.clone()).or_insert(*q);
        *e = (*e).max(*q);
    }
}

/// `wild`: whether wildcards may match at this level (not at a `$` first level).
fn walk(node: &Node, levels: &[&str], wild: bool, out: &mut HashMap<String, u8>) {
    if wild {
        // `x/#` matches `x` itself and everything below it.
        merge(out, &node.hash);
    }
    let Some((first, rest)) = levels.split_first() else {
        return;
    };
    if let Some(child) = node.children.get(*first) {
        if rest.is_empty() {
            merge(out, &child.here);
            // `x/#` also matches `x`.
            merge(out, &child.hash);
        } else {
            walk(child, rest, true, out);
        }
    }
    if wild {
        if let Some(plus) = &node.plus {
            if rest.is_empty() {
                merge(out, &plus.here);
                merge(out, &plus.hash);
            } else {
                walk(plus, rest, true, out);
            }
        }
    }
}

fn remove_at(node: &mut Node, levels: &[&str], session: &str) -> bool {
    let Some((first, rest)) = levels.split_first() else {
        return false;
    };
    if *first == "#" {
        return node.hash.remove(session).is_some();
    }
    let child = if *first == "+" {
        node.plus.as_deref_mut()
    } else {
        node.children.get_mut(*first)
    };
    let Some(child) = child else {
        return false;
    };
    let removed = if rest.is_empty() {
        child.here.remove(session).is_some()
    } else {
        remove_at(child, rest, session)
    };
    // Prune what no filter needs any more.
    if child.is_empty() {
        if *first == "+" {
            node.plus = None;
        } else {
            node.children.remove(*first);
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    // The examples of MQTT 3.1.1 section 4.7.1 and 4.7.2.
    #[test]
    fn spec_examples_match() {
        assert!(filter_matches(
            "sport/tennis/player1/#",
            "sport/tennis/player1"
        ));
        assert!(filter_matches(
            "sport/tennis/player1/#",
            "sport/tennis/player1/ranking"
        ));
        assert!(filter_matches(
            "sport/tennis/player1/#",
            "sport/tennis/player1/score/wimbledon"
        ));
        assert!(filter_matches("sport/#", "sport"));
        assert!(filter_matches("#", "anything/at/all"));
        assert!(filter_matches("sport/tennis/+", "sport/tennis/player1"));
        assert!(!filter_matches(
            "sport/tennis/+",
            "sport/tennis/player1/ranking"
        ));
        assert!(!filter_matches("sport/+", "sport"));
        assert!(filter_matches("sport/+", "sport/"));
        assert!(filter_matches("+/+", "/finance"));
        assert!(filter_matches("/+", "/finance"));
        assert!(!filter_matches("+", "/finance"));
        assert!(!filter_matches("#", "$SYS/broker"));
        assert!(!filter_matches("+/monitor/Clients", "$SYS/monitor/Clients"));
        assert!(filter_matches("$SYS/#", "$SYS/broker"));
        assert!(filter_matches("$SYS/monitor/+", "$SYS/monitor/Clients"));
        assert!(!filter_matches("a/b", "a/b/c"));
        assert!(!filter_matches("a/b/c", "a/b"));
    }

    /// The trie answers exactly what `filter_matches` answers, filter by filter.
    #[test]
    fn trie_agrees_with_filter_matches() {
        let filters = [
            "#",
            "+",
            "+/+",
            "/+",
            "a",
            "a/#",
            "a/+",
            "a/b",
            "a/b/#",
            "a/+/c",
            "+/b/#",
            "$SYS/#",
            "$SYS/+",
            "sport/tennis/player1/#",
            "",
            "/",
            "a//b",
        ];
        let topics = [
            "a",
            "a/b",
            "a/b/c",
            "a/x/c",
            "/finance",
            "$SYS/x",
            "$SYS",
            "sport/tennis/player1",
            "b",
            "",
            "/",
            "a//b",
            "x/b",
            "x/b/y",
        ];
        let mut m = Matcher::default();
        for (i, f) in filters.iter().enumerate() {
            m.insert(f, &format!("s{i}"), (i % 3) as u8);
        }
        for t in topics {
            let got = m.matches(t);
            for (i, f) in filters.iter().enumerate() {
                let want = filter_matches(f, t);
                assert_eq!(
                    got.contains_key(&format!("s{i}")),
                    want,
                    "filter {f:?} topic {t:?}"
                );
            }
        }
        // Removing every filter empties it.
        for (i, f) in filters.iter().enumerate() {
            m.remove(f, &format!("s{i}"));
        }
        assert!(m.is_empty());
        assert!(m.root.is_empty());
    }

    #[test]
    fn one_entry_per_session_with_the_highest_qos() {
        let mut m = Matcher::default();
        m.insert("a/#", "s", 0);
        m.insert("a/b", "s", 2);
        m.insert("a/+", "t", 1);
        let got = m.matches("a/b");
        assert_eq!(got.len(), 2);
        assert_eq!(got["s"], 2);
        assert_eq!(got["t"], 1);
        m.remove("a/b", "s");
        assert_eq!(m.matches("a/b")["s"], 0);
        m.remove("a/b", "nobody");
        assert_eq!(m.filters, 2);
    }
}
