//! Where in relay.toml a problem is: the line of the key a problem's path names
//! (`account[0].token`, `route[1].to`), or of its table when the key is not written there.

use std::ops::Range;

use toml_edit::{ImDocument, Item, Table};

/// The file's text, parsed with the positions of its keys.
pub(super) struct Source {
    doc: ImDocument<String>,
}

impl Source {
    pub(super) fn parse(text: String) -> Option<Source> {
        ImDocument::parse(text).ok().map(|doc| Source { doc })
    }

    /// The 1-based line of the key at `path`, or of the nearest table on its way.
    pub(super) fn line_of(&self, path: &str) -> Option<usize> {
        let mut table: &Table = self.doc.as_item().as_table()?;
        let mut found: Option<Range<usize>> = None;
        for segment in path.split('.') {
            let (name, index) = match segment.split_once('[') {
                Some((name, rest)) => (name, rest.strip_suffix(']')?.parse::<usize>().ok()),
                None => (segment, None),
            };
            let Some((key, item)) = table.get_key_value(name) else {
                break;
            };
            found = key.span().or(found);
            match (item, index) {
                (Item::ArrayOfTables(tables), Some(i)) => {
                    let Some(element) = tables.get(i) else { break };
                    found = element.span().or(found);
                    table = element;
                }
                (Item::Table(inner), None) => {
                    found = inner.span().or(found);
                    table = inner;
                }
                _ => break,
            }
        }
        let start = found?.start;
        let text = self.doc.raw();
        Some(text.get(..start)?.matches('\n').count() + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_is_found_at_its_key_or_its_table() {
        let text = "[server]\nlisten = \"x\"\n\n[[account]]\nname = \"a\"\n\n[[account]]\nname = \"b\"\ntoken = \"t\"\nto = [\"x\",\n  \"y\"]\n";
        let source = Source::parse(text.to_owned()).expect("parse");
        assert_eq!(source.line_of("server.listen"), Some(2));
        assert_eq!(source.line_of("server"), Some(1));
        assert_eq!(source.line_of("account[1].token"), Some(9));
        assert_eq!(source.line_of("account[1].to"), Some(10));
        // Not written: the table it would be in.
        assert_eq!(source.line_of("account[0].token"), Some(4));
        assert_eq!(source.line_of("store.path"), None);
    }
}
