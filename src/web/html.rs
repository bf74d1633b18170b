//! A small HTML writer in which every value is escaped: markup goes in only as
//! `&'static str` (written in this crate's source), everything else through [`Html::text`]
//! or [`Html::attr`], which escape it. No template can forget to escape a holder's name.

/// An HTML document or fragment being written.
#[derive(Default)]
pub struct Html {
    out: String,
}

/// `s` with `&`, `<`, `>`, `"` and `'` replaced by character references: safe in element
/// content and in a quoted attribute value.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    escape_into(&mut out, s);
    out
}

fn escape_into(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
}

/// `s` percent-encoded for one path segment or query value (RFC 3986 unreserved kept).
pub fn url_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Html {
    pub fn new() -> Html {
        Html {
            out: String::with_capacity(16 * 1024),
        }
    }
    /// Markup from this crate's source.
    pub fn raw(&mut self, markup: &'static str) -> &mut Self {
        self.out.push_str(markup);
        self
    }
    /// A value, escaped.
    pub fn text(&mut self, value: &str) -> &mut Self {
        escape_into(&mut self.out, value);
        self
    }
    /// ` name="value"` with the value escaped (the name is markup).
    pub fn attr(&mut self, name: &'static str, value: &str) -> &mut Self {
        self.out.push(' ');
        self.out.push_str(name);
        self.out.push_str("=\"");
        escape_into(&mut self.out, value);
        self.out.push('"');
        self
    }
    /// An element with text content: `<tag attrs>value</tag>`.
    pub fn elem(&mut self, tag: &'static str, class: Option<&str>, value: &str) -> &mut Self {
        self.out.push('<');
        self.out.push_str(tag);
        if let Some(c) = class {
            self.attr("class", c);
        }
        self.out.push('>');
        self.text(value);
        self.out.push_str("</");
        self.out.push_str(tag);
        self.out.push('>');
        self
    }
    pub fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_special_character_is_escaped() {
        assert_eq!(
            escape(r#"<script>alert("x&'y')</script>"#),
            "&lt;script&gt;alert(&quot;x&amp;&#39;y&#39;)&lt;/script&gt;"
        );
        assert_eq!(escape("plain é"), "plain é");
    }

    #[test]
    fn text_and_attributes_are_escaped_markup_is_not() {
        let mut h = Html::new();
        h.raw("<td").attr("data-id", "a\"><b>").raw(">");
        h.text("<img src=x onerror=alert(1)>").raw("</td>");
        h.elem("span", Some("x\" onclick=\"y"), "&");
        let s = h.finish();
        assert_eq!(
            s,
            "<td data-id=\"a&quot;&gt;&lt;b&gt;\">&lt;img src=x onerror=alert(1)&gt;</td>\
             <span class=\"x&quot; onclick=&quot;y\">&amp;</span>"
        );
    }

    #[test]
    fn url_components_are_percent_encoded() {
        assert_eq!(url_component("cert:0a/b c?&"), "cert%3A0a%2Fb%20c%3F%26");
        assert_eq!(url_component("é"), "%C3%A9");
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    fn unescape(s: &str) -> String {
        s.replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&#39;", "'")
            .replace("&amp;", "&")
    }

    proptest! {
        /// Escaped text has no character that could open a tag or end an attribute, and
        /// loses nothing.
        #[test]
        fn escaped_text_is_inert_and_lossless(s in ".{0,200}") {
            let e = escape(&s);
            prop_assert!(!e.contains(['<', '>', '"', '\'']));
            prop_assert_eq!(unescape(&e), s);
        }
    }
}
