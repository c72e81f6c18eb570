//! Test support: whether a method's grammar admits a reply, decided by llguidance itself (the
//! compiler mistral.rs decodes under), one byte per token so that no tokenizer is needed.

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, InferenceCapabilities};
use llguidance::{Matcher, ParserFactory};

/// Whether `text` is a complete sentence of the Lark grammar `lark`; panics when the grammar
/// does not compile, since every grammar a method sends must.
pub fn accepts(lark: &str, text: &str) -> bool {
    let env = ApproximateTokEnv::single_byte_env();
    let factory = ParserFactory::new(&env, InferenceCapabilities::default(), &[])
        .expect("a parser factory over single bytes");
    let mut m = Matcher::new(factory.create_parser(TopLevelGrammar::from_lark(lark.to_owned())));
    assert!(
        !m.is_error(),
        "the grammar does not compile: {:?}\n{lark}",
        m.get_error()
    );
    let tokens: Vec<u32> = text.bytes().map(u32::from).collect();
    m.consume_tokens(&tokens).is_ok() && !m.is_error() && m.is_accepting().unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::accepts;

    #[test]
    fn the_judge_grammar_takes_a_reason_and_a_grade_only() {
        let g = crate::learn::verify::JUDGE_GRAMMAR;
        assert!(accepts(g, "The numbers match.\nGRADE: CORRECT"));
        assert!(accepts(g, "They differ.\nGRADE: INCORRECT\n"));
        assert!(!accepts(g, "GRADE: CORRECT"));
        assert!(!accepts(g, "Fine.\nGRADE: MAYBE"));
    }

    #[test]
    fn a_round_acts_with_an_offered_tool_or_answers() {
        let g =
            crate::methods::iterresearch::round_grammar(["calculate", "search_experience"], false);
        assert!(accepts(
            &g,
            "Report: need the sum.\nAction: calculate: 2 + 3"
        ));
        assert!(accepts(&g, "Report: done.\nFinal answer: 5\n"));
        assert!(accepts(
            &g,
            "Report: look it up.\nAction: search_experience: sums"
        ));
        assert!(!accepts(
            &g,
            "Report: x.\nAction: calculate: two plus three"
        ));
        assert!(!accepts(&g, "Report: x.\nAction: python: print(1)"));
        let last = crate::methods::iterresearch::round_grammar(["calculate"], true);
        assert!(!accepts(&last, "Report: x.\nAction: calculate: 1+1"));
        assert!(accepts(&last, "Report: x.\nFinal answer: 2"));
    }
}
