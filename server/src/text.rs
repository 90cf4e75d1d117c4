//! Text that reaches a terminal or a log from someone else: a client id, an
//! event type, a stored payload, a backend's answer.
//!
//! A control character (an ANSI escape starts with ESC) can rewrite what an
//! operator's terminal shows, and a bidi control or a zero-width character
//! can make one text look like another. The server refuses such characters
//! in a client id ([`is_unsafe_to_print`]); the tools that print what others
//! wrote (the inspector, the conformance checker) escape them ([`printable`]).

use std::borrow::Cow;

/// True for the characters that must not reach a terminal as they are:
/// control characters (C0, DEL, C1), bidi controls (U+061C, U+200E, U+200F,
/// U+202A-U+202E, U+2066-U+2069), zero-width and invisible characters
/// (U+00AD, U+180E, U+200B-U+200D, U+2060-U+2064, U+FEFF) and the line and
/// paragraph separators (U+2028, U+2029).
pub fn is_unsafe_to_print(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{00AD}'
                | '\u{061C}'
                | '\u{180E}'
                | '\u{200B}'..='\u{200F}'
                | '\u{2028}'..='\u{202E}'
                | '\u{2060}'..='\u{2064}'
                | '\u{2066}'..='\u{2069}'
                | '\u{FEFF}'
        )
}

/// `text` with each character of [`is_unsafe_to_print`] written as
/// `\u{XXXX}` (its code point in hex); borrowed when there is none.
pub fn printable(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_unsafe_to_print) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if is_unsafe_to_print(c) {
            out.push_str(&format!("\\u{{{:04X}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_can_rewrite_a_terminal_and_keeps_the_rest() {
        assert!(matches!(printable("order.placed é 😀"), Cow::Borrowed(_)));
        assert_eq!(
            printable("a\u{1b}[2Jb\u{202E}c\u{200B}d\ne"),
            "a\\u{001B}[2Jb\\u{202E}c\\u{200B}d\\u{000A}e"
        );
    }
}
