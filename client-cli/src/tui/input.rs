//! The input line of the chat screen: a small multi-line editor. Nothing but key presses
//! and pastes changes it, so a message arriving never disturbs what is being typed.

use unicode_width::UnicodeWidthChar;

/// Most bytes the editor holds: four times the largest message body, so that an
/// over-long paste can still be seen and shortened; past it, input is refused.
pub const MAX_INPUT: usize = 4 * missive_spec::limits::MAX_CONTENT_BODY;

/// Why the editor refused input.
#[derive(Debug, PartialEq, Eq)]
pub struct Full;

#[derive(Default, Debug)]
pub struct Editor {
    text: String,
    /// Byte offset of the cursor, always on a character boundary.
    cursor: usize,
}

impl Editor {
    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn is_empty(&self) -> bool {
        self.text.is_empty()
    }

    /// Inserts `s` at the cursor (a paste: line ends become `\n`), or nothing if the
    /// result would exceed [`MAX_INPUT`].
    pub fn insert_str(&mut self, s: &str) -> Result<(), Full> {
        let s = s.replace("\r\n", "\n").replace('\r', "\n");
        if self.text.len() + s.len() > MAX_INPUT {
            return Err(Full);
        }
        self.text.insert_str(self.cursor, &s);
        self.cursor += s.len();
        Ok(())
    }

    pub fn insert(&mut self, c: char) -> Result<(), Full> {
        self.insert_str(c.encode_utf8(&mut [0; 4]))
    }

    fn prev_boundary(&self) -> Option<usize> {
        self.text[..self.cursor].char_indices().next_back().map(|(i, _)| i)
    }

    fn next_boundary(&self) -> Option<usize> {
        self.text[self.cursor..].chars().next().map(|c| self.cursor + c.len_utf8())
    }

    pub fn backspace(&mut self) {
        if let Some(i) = self.prev_boundary() {
            self.text.replace_range(i..self.cursor, "");
            self.cursor = i;
        }
    }

    pub fn delete(&mut self) {
        if let Some(i) = self.next_boundary() {
            self.text.replace_range(self.cursor..i, "");
        }
    }

    pub fn left(&mut self) {
        if let Some(i) = self.prev_boundary() {
            self.cursor = i;
        }
    }

    pub fn right(&mut self) {
        if let Some(i) = self.next_boundary() {
            self.cursor = i;
        }
    }

    /// To the start of the cursor's line.
    pub fn home(&mut self) {
        self.cursor = self.text[..self.cursor].rfind('\n').map_or(0, |i| i + 1);
    }

    /// To the end of the cursor's line.
    pub fn end(&mut self) {
        self.cursor = self.text[self.cursor..].find('\n').map_or(self.text.len(), |i| self.cursor + i);
    }

    /// Deletes the word before the cursor (Ctrl-W).
    pub fn delete_word(&mut self) {
        let before = &self.text[..self.cursor];
        let trimmed = before.trim_end();
        let start = trimmed.rfind(char::is_whitespace).map_or(0, |i| i + 1);
        self.text.replace_range(start..self.cursor, "");
        self.cursor = start;
    }

    /// Deletes from the start of the cursor's line to the cursor (Ctrl-U).
    pub fn delete_to_line_start(&mut self) {
        let end = self.cursor;
        self.home();
        self.text.replace_range(self.cursor..end, "");
    }

    /// Empties the editor and returns what it held.
    pub fn take(&mut self) -> String {
        self.cursor = 0;
        std::mem::take(&mut self.text)
    }

    /// The text wrapped to `width` columns (by character, so the cursor's place is
    /// exact), and the cursor's (row, column) in it.
    pub fn layout(&self, width: u16) -> (Vec<String>, (u16, u16)) {
        let width = usize::from(width.max(1));
        let mut rows = vec![String::new()];
        let (mut col, mut cursor) = (0usize, (0, 0));
        for (i, c) in self.text.char_indices() {
            if i == self.cursor {
                cursor = (rows.len() - 1, col);
            }
            if c == '\n' {
                rows.push(String::new());
                col = 0;
                continue;
            }
            let w = c.width().unwrap_or(0);
            if col + w > width {
                rows.push(String::new());
                col = 0;
            }
            if let Some(r) = rows.last_mut() {
                r.push(c);
            }
            col += w;
        }
        if self.cursor == self.text.len() {
            if col >= width {
                rows.push(String::new());
                col = 0;
            }
            cursor = (rows.len() - 1, col);
        }
        let clamp = |n: usize| u16::try_from(n).unwrap_or(u16::MAX);
        (rows, (clamp(cursor.0), clamp(cursor.1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn typed(s: &str) -> Editor {
        let mut e = Editor::default();
        for c in s.chars() {
            e.insert(c).unwrap();
        }
        e
    }

    #[test]
    fn edits_at_the_cursor_on_character_boundaries() {
        let mut e = typed("héllo");
        e.left();
        e.left();
        e.backspace();
        e.insert('L').unwrap();
        assert_eq!(e.text(), "héLlo");
        e.home();
        e.delete();
        e.end();
        e.insert('!').unwrap();
        assert_eq!(e.text(), "éLlo!");
        assert_eq!(e.take(), "éLlo!");
        assert!(e.is_empty());
    }

    #[test]
    fn multi_line_paste_words_and_lines() {
        let mut e = typed("first ");
        e.insert_str("line\r\nsecond line").unwrap();
        assert_eq!(e.text(), "first line\nsecond line");
        e.delete_word();
        assert_eq!(e.text(), "first line\nsecond ");
        e.delete_to_line_start();
        assert_eq!(e.text(), "first line\n");
        e.home();
        assert_eq!(e.layout(20).1, (1, 0));
    }

    #[test]
    fn refuses_input_past_its_bound_and_keeps_what_it_had() {
        let mut e = typed("keep");
        assert_eq!(e.insert_str(&"x".repeat(MAX_INPUT)), Err(Full));
        assert_eq!(e.text(), "keep");
    }

    #[test]
    fn layout_wraps_and_places_the_cursor() {
        let e = typed("abcdefg\nhi");
        let (rows, cursor) = e.layout(3);
        assert_eq!(rows, vec!["abc", "def", "g", "hi"]);
        assert_eq!(cursor, (3, 2));
        let (rows, cursor) = typed("abc").layout(3);
        assert_eq!(rows, vec!["abc", ""]);
        assert_eq!(cursor, (1, 0));
    }
}
