"""Prompt templates of the miniature's tasks, in the style of P3's promptsource templates (Bach et al. 2022).

Each dataset has three templates: (name, input format, answer choices or None for a generated answer). Choice
formats are filled from the example's fields; rank classification scores them (T0's evaluation). Held-in datasets
mirror T0's training clusters, held-out datasets the paper's eight evaluation sets; every held-out answer format
(yes / no, yes / no / maybe, true / false / neither, a name, a sentence among two or four) has a training
counterpart (named beside each held-out dataset), while no held-out task *type* is trained.
"""

YN = ["yes", "no"]
YNM = ["yes", "no", "maybe"]
TFN = ["true", "false", "neither"]
KINDS6 = ["bird", "fish", "fruit", "tool", "toy", "tree"]

HELD_IN = {
    # paraphrase (T0: MRPC, QQP, PAWS)
    "para": [
        ("same_meaning", "Sentence 1: {s1} Sentence 2: {s2} Do these two sentences mean the same thing? yes or no", YN),
        ("paraphrase", "{s1} {s2} Are these two sentences paraphrases of each other? yes or no", YN),
        ("say_same", "Does the sentence \"{s1}\" say the same as \"{s2}\"? Answer yes or no.", YN)],
    # sentiment (T0: IMDB, Yelp, Amazon, Rotten Tomatoes), with a three-way yes / no / maybe template
    "senti": [
        ("pos_neg", "{text} Is this review positive or negative?", ["positive", "negative"]),
        ("liked", "Review: {text} Did the reviewer like it? yes or no", YN),
        ("liked3", "{text} Did {p} like it? yes, no, or maybe", YNM)],
    # topic classification (T0: AG News, DBPedia, TREC)
    "topic": [
        ("what_kind", "What kind of thing is this text about? bird, fish, fruit, tool, toy or tree. {text}", KINDS6),
        ("topic", "Text: {text} Topic:", KINDS6),
        ("category", "{text} Which category does this belong to? Options: bird, fish, fruit, tool, toy, tree.", KINDS6)],
    # multiple-choice QA (T0: QASC, QuaRTz, QuAIL, DREAM, Social IQA...), with sentence-valued options
    "mcqa": [
        ("question_options", "Question: {question} Options: {options}. Answer:", "{choices}"),
        ("which_true", "Which of these sentences is true? {options_sent} Answer:", "{choices}"),
        ("pick", "{question} Pick the right answer from the list: {options}", "{choices}")],
    # extractive QA (T0: Quoref, ROPES, DuoRC, Adversarial QA): names and things read from a passage
    "exqa": [
        ("question", "{passage} Question: {question} Answer:", None),
        ("read", "Read the text and answer the question. {passage} {question}", None),
        ("context", "Context: {passage} Q: {question} A:", None)],
    # closed-book QA (T0: WikiQA, Hotpot QA, Wiki Hop), with a true / false / neither statement template
    "cbqa": [
        ("question", "Question: {question} Answer:", None),
        ("answer", "Answer the question: {question}", None),
        ("statement", "Statement: {statement} Is this true, false, or neither?", TFN)],
    # structure-to-text (T0: Common Gen, Wiki Bio)
    "s2t": [
        ("words", "Make a sentence with these words: {words}.", None),
        ("concepts", "Concepts: {words}. Write a sentence about them.", None),
        ("table", "{table} Write a sentence from this table.", None)],
    # summarisation (T0: XSum, Gigaword, SAMSum, CNN/DM)
    "summ": [
        ("summarize", "{story} Summarize the story in one sentence.", None),
        ("tldr", "{story} TL;DR:", None),
        ("title", "Write a short title for this story: {story}", None)],
}

HELD_OUT = {
    # NLI, two-way (RTE); format counterpart: yes / no (para, senti)
    "rte": [
        ("imply", "{premise} Question: Does this imply that \"{hyp}\"? yes or no", YN),
        ("based_on", "{premise} Based on the previous passage, is it true that \"{hyp}\"? yes or no", YN),
        ("assume", "Given \"{premise}\" Should we assume that \"{hyp}\" is true? yes or no", YN)],
    # NLI, three-way (CB); format counterpart: yes / no / maybe (senti liked3)
    "cb": [
        ("infer", "Suppose {premise} Can we infer that \"{hyp}\"? yes, no, or maybe", YNM),
        ("follow", "{premise} Does it follow that \"{hyp}\"? yes, no, or maybe", YNM),
        ("guaranteed", "Given that {premise} Is it guaranteed that \"{hyp}\"? yes, no, or maybe", YNM)],
    # NLI, three-way (ANLI); format counterpart: true / false / neither (cbqa statement)
    "anli": [
        ("tfn", "{premise} Question: {hyp} true, false, or neither?", TFN),
        ("claim", "{premise} Using only the above, is the claim \"{hyp}\" true, false, or neither?", TFN),
        ("must_be", "Given that {premise} Then, is \"{hyp}\" true, false, or neither?", TFN)],
    # coreference (WSC); format counterpart: yes / no
    "wsc": [
        ("refer", "{passage} In the passage above, does the pronoun \"{pron}\" refer to {cand}? yes or no", YN),
        ("by_means", "{passage} Here, by \"{pron}\" they mean {cand}. yes or no?", YN),
        ("who_is", "{passage} Is \"{pron}\" the same person as {cand}? yes or no", YN)],
    # coreference (WinoGrande); format counterpart: a name (exqa)
    "winogrande": [
        ("blank", "{sentence} What does the _ in the above sentence refer to? {a} or {b}?", ["{a}", "{b}"]),
        ("fill", "Fill in the blank: {sentence} Options: {a}, {b}", ["{a}", "{b}"]),
        ("replace", "{sentence} Replace the _ with the right name: {a} or {b}.", ["{a}", "{b}"])],
    # cause and effect (COPA); format counterpart: a sentence among two (mcqa which_true)
    "copa": [
        ("options", "{premise} {ask} Option 1: {c1} Option 2: {c2}", ["{c1}", "{c2}"]),
        ("choose", "\"{premise}\" {ask} Choose between \"{c1}\" and \"{c2}\".", ["{c1}", "{c2}"]),
        ("plausible", "Pick the more likely answer. {premise} {ask} {c1} or {c2}", ["{c1}", "{c2}"])],
    # story completion (HellaSwag); format counterpart: a sentence among four (mcqa which_true)
    "hellaswag": [
        ("ending", "{context} How does the story end? {e0} / {e1} / {e2} / {e3}", ["{e0}", "{e1}", "{e2}", "{e3}"]),
        ("continue", "Complete the story: {context}", ["{e0}", "{e1}", "{e2}", "{e3}"]),
        ("next", "{context} What happens next? Options: {e0} {e1} {e2} {e3}", ["{e0}", "{e1}", "{e2}", "{e3}"])],
    # word sense (WiC); format counterpart: yes / no
    "wic": [
        ("same_sense", "{s1} {s2} Is the word \"{word}\" used in the same sense in the two sentences? yes or no", YN),
        ("meaning", "Does \"{word}\" mean the same thing in these sentences? {s1} {s2} yes or no", YN),
        ("similar", "Sentence A: {s1} Sentence B: {s2} Is \"{word}\" used the same way in both? yes or no", YN)],
}

# the copa question per direction
COPA_ASK = {"effect": "What happened as a result?", "cause": "What was the cause?"}
# datasets mirrored, for the report
MIRRORS = {"rte": "RTE", "cb": "CB", "anli": "ANLI", "wsc": "WSC", "winogrande": "WinoGrande", "copa": "COPA",
           "hellaswag": "HellaSwag", "wic": "WiC"}
TYPES = {"rte": "NLI", "cb": "NLI", "anli": "NLI", "wsc": "coreference", "winogrande": "coreference",
         "copa": "cause and effect", "hellaswag": "story completion", "wic": "word sense"}


def template_text():
    """Every template's text (for the vocabulary): the formats with their fields removed."""
    import re
    out = []
    for group in (HELD_IN, HELD_OUT):
        for temps in group.values():
            for _, fmt, choices in temps:
                out.append(re.sub(r"\{[a-z0-9_]+\}", " ", fmt))
                if isinstance(choices, list):
                    out.append(" ".join(c for c in choices if "{" not in c))
    out += list(COPA_ASK.values())
    return out
