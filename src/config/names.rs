//! Problems name an element of an array of tables by its `name` when it has one of its own
//! (`route "qr-login".to`), by its index otherwise (`route[2].to`): the checks work on indexes,
//! which also find the line, and the names are put in last.

use figment::value::{Dict, Value};

/// The arrays of tables whose elements have a `name`.
const NAMED: [&str; 3] = ["account", "target", "route"];

/// The `name` of each element of each array of tables, as written (parsed or not); `None` for
/// an element without one, or whose name another element also has.
pub(super) struct Names(Vec<(&'static str, Vec<Option<String>>)>);

impl Names {
    pub(super) fn of(root: &Dict) -> Names {
        let names = NAMED.map(|section| {
            let written: Vec<Option<&str>> = match root.get(section) {
                Some(Value::Array(_, items)) => items
                    .iter()
                    .map(|item| item.as_dict()?.get("name")?.as_str())
                    .collect(),
                _ => Vec::new(),
            };
            let own = written
                .iter()
                .map(|name| {
                    name.filter(|n| written.iter().filter(|w| **w == Some(*n)).count() == 1)
                        .map(str::to_owned)
                })
                .collect();
            (section, own)
        });
        Names(names.into())
    }

    /// `problem` (`at: why`) with its leading `section[i]` put as `section "name"`.
    pub(super) fn put(&self, problem: String) -> String {
        for (section, names) in &self.0 {
            let Some(rest) = problem
                .strip_prefix(section)
                .and_then(|r| r.strip_prefix('['))
            else {
                continue;
            };
            let Some((index, rest)) = rest.split_once(']') else {
                continue;
            };
            let name = index
                .parse::<usize>()
                .ok()
                .and_then(|i| names.get(i)?.as_deref());
            // A problem with the name itself is not told by that name.
            if let Some(name) = name.filter(|_| !rest.starts_with(".name:")) {
                return format!("{section} {name:?}{rest}");
            }
        }
        problem
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(toml: &str) -> Dict {
        use figment::providers::{Format, Toml};
        figment::Figment::from(Toml::string(toml))
            .extract::<Dict>()
            .expect("toml")
    }

    #[test]
    fn an_element_is_named_by_its_own_name_or_its_index() {
        let names = Names::of(&root(
            "[[route]]\nname = \"qr-login\"\n[[route]]\nto = []\n\
             [[target]]\nname = \"a\"\n[[target]]\nname = \"a\"\n[[account]]\nname = 7\n",
        ));
        let put = |p: &str| names.put(p.to_owned());
        assert_eq!(put("route[0].to: x"), "route \"qr-login\".to: x");
        assert_eq!(
            put("route[0]: give reply"),
            "route \"qr-login\": give reply"
        );
        assert_eq!(put("route[0].name: bad"), "route[0].name: bad");
        // No name, a name two elements share, a name that is not a string, out of range.
        assert_eq!(put("route[1].to: x"), "route[1].to: x");
        assert_eq!(put("target[1].url: x"), "target[1].url: x");
        assert_eq!(put("account[0].token: x"), "account[0].token: x");
        assert_eq!(put("route[9].to: x"), "route[9].to: x");
        // Only the leading element.
        assert_eq!(put("server.listen: route[0]"), "server.listen: route[0]");
    }
}
