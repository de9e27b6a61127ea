//! `/proc` text is input: no parser may panic on it, whatever it holds.

use proptest::prelude::*;
use tracee::proc;

/// Text that looks a bit like /proc files: digits, hex, separators, brackets,
/// parentheses, tabs, newlines and some non-ASCII.
fn procish() -> impl Strategy<Value = String> {
    proptest::string::string_regex("[0-9a-fA-F xX:/()\\[\\]\t\n\\-.,rwxsp_é\\\\]{0,400}")
        .expect("valid regex")
}

proptest! {
    #[test]
    fn text_parsers_do_not_panic(text in procish()) {
        let _ = proc::maps::parse(&text);
        let _ = proc::smaps::parse(&text);
        let _ = proc::stat::parse(&text);
        let _ = proc::status::parse(&text);
        let _ = proc::fd::parse_fdinfo(&text);
        let _ = proc::limits::parse(&text);
        let _ = proc::timers::parse(&text);
        let _ = proc::mountinfo::parse(&text);
        let _ = proc::task::parse_children(&text);
        let _ = proc::unescape_octal(&text);
    }

    #[test]
    fn arbitrary_strings_do_not_panic(text in any::<String>()) {
        let _ = proc::maps::parse(&text);
        let _ = proc::stat::parse(&text);
        let _ = proc::status::parse(&text);
        let _ = proc::mountinfo::parse(&text);
        let _ = proc::unescape_octal(&text);
    }

    #[test]
    fn auxv_parser_does_not_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = proc::auxv::parse(&bytes);
    }

    #[test]
    fn maps_lines_round_trip(start in 0u64..(1 << 46), len in 1u64..(1 << 20), ino in 0u64..1_000_000,
                             name in "[a-z/ ]{0,30}") {
        let start = start & !0xfff;
        let end = start + (len << 12);
        let line = format!("{start:x}-{end:x} rw-p 00001000 fe:01 {ino}   /x{name}");
        let v = proc::maps::parse_line(&line).expect("well-formed line");
        prop_assert_eq!(v.start.get(), start);
        prop_assert_eq!(v.end.get(), end);
        prop_assert_eq!(v.inode, ino);
        prop_assert_eq!(v.path, Some(format!("/x{name}")));
    }
}
