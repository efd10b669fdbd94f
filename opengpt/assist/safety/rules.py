"""Pattern rules for prompt injection, jailbreaks and data exfiltration, on normalized text.

`match_rules(normalize(text))` returns a `RuleHit` per rule match. The rules read the output of
`normalize.py` (lower case, leetspeak and letter spacing undone, letters tripled or more collapsed to
one, whitespace collapsed, line breaks kept), so each pattern is written once in plain lower case.
Categories:
* `injection`: "ignore / disregard / forget (all) previous / prior / above instructions", "reveal /
  print your system prompt / initial instructions", "you are no longer bound by", and fake role or
  turn tags (`<|im_start|>system`, `[system]`, `<<sys>>`, `### new instructions`);
* `jailbreak`: DAN / "do anything now", "developer mode enabled" personas, "you are jailbroken",
  "no restrictions / filters / guidelines" addressed to the model, "stay in character no matter
  what", and the AIM / STAN / DUDE personas;
* `exfiltration`: markdown images or links whose URL carries data (`![x](https://...?data=`), URL
  templates to be filled with the conversation, and instructions to send secrets to a URL;
* `abuse`: text aimed at the reader, for the monitor and output layers: "go kill yourself", "I will
  find you", "you are a worthless idiot". The toxicity model scores these short phrases too low (its
  training data is mostly longer text), so the safety monitor treats a hit as toxic.

Precision over recall: the rules are the cheap first layer (the classifier sees the rest), and a
false block on "how do I ignore warnings in pytest" costs more trust than a missed attack. So every
keyword needs its object: "ignore" hits only with instructions / rules / prompt and an adjective
like previous or all ("ignore the previous error" passes), "DAN" only as a persona ("you are DAN",
"DAN mode"; "what does DAN stand for" passes), "developer mode" only as the jailbreak persona, not
the Android setting. The table is data, `RULES`: (name, category, pattern), compiled once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class RuleHit:
    rule: str
    category: str
    start: int  # span in the normalized text
    end: int


_ALL = r"al{1,2}"  # normalize() collapses "alll" to "al"
_PREV = r"(?:previous|prior|above|earlier|preceding|foregoing|original|initial|system|developer|safety|old|existing)"
_ORDERS = (r"(?:instructions?|rules?|prompts?|directions?|directives?|guidelines?|commands?|messages?|context|"
           r"guardrails?|programming|restrictions?|constraints?|polic(?:y|ies))")
_LIMITS = r"(?:restrictions?|filters?|guidelines?|limitations?|limits?|censorship|rules|boundaries|constraints|ethics|morals)"
_YOU_ARE = r"(?:you\s+are|you're|you\s+will\s+be|you\s+have\s+become)"
_PERSONA = r"(?:dan|aim|stan|dude|anti-?dan|betterdan|mongo\s+tom|evil\s+confidant|ucar|kevin)"
_SECRETS = (r"(?:conversation|chat(?:\s+history)?|(?:chat\s+|message\s+)?history|previous\s+messages|passwords?|"
            r"credentials|(?:api\s+)?keys?|secrets?|tokens?|system\s+prompt|(?:the\s+)?user'?s?\s+(?:data|information|"
            r"details|emails?|messages)|(?:personal|private|sensitive)\s+(?:data|information|details)|everything\s+above|"
            r"(?:this|that|the)\s+(?:information|data))")
_URL = r"(?:https?://|www\.)"
# an order passed on to someone else ("my boss told me to ignore the earlier instructions") is not one
# given to the model; fixed-width lookbehinds, one per pronoun
_NOT_REPORTED = r"(?<!me to )(?<!us to )(?<!him to )(?<!her to )(?<!them to )"
# a question about how the user does something ("how do I enable god mode in Windows") is not a command
_NOT_HOW_TO = r"(?<!how do i )(?<!how can i )(?<!how to )(?<!how do you )"

# (name, category, pattern)
RULES: list[tuple[str, str, str]] = [
    # -- injection ---------------------------------------------------------------------------------
    ("ignore_previous_instructions", "injection",
     rf"{_NOT_REPORTED}\b(?:ignore|disregard|forget|override|bypass|discard|skip|abandon|drop)\s+(?:(?:{_ALL}|any|every|each|of|the|"
     rf"your|my|these|those|everything|what|that)\s+){{0,3}}{_PREV}\s+{_ORDERS}\b"),
    ("ignore_all_instructions", "injection",
     rf"{_NOT_REPORTED}\b(?:ignore|disregard|forget|override|bypass)\s+(?:{_ALL}\s+(?:of\s+)?)?(?:your|{_ALL})\s+(?:\w+\s+)?"
     rf"(?:instructions|rules|programming|guidelines|guardrails|restrictions|directives|policies)\b"),
    ("ignore_everything_before", "injection",
     rf"{_NOT_REPORTED}\b(?:ignore|disregard|forget)\s+(?:everything|{_ALL}(?:\s+(?:the\s+)?text)?)\s+(?:you(?:'ve|\s+have)?\s+(?:been\s+)?"
     rf"(?:told|taught|instructed|given)|(?:written\s+|said\s+)?above|before\s+this|(?:that\s+)?(?:came|comes)\s+before)\b"),
    ("new_instructions_override", "injection",
     r"\b(?:your\s+)?new\s+(?:instructions|rules|directives)\s+(?:are|follow)\s*:"),
    ("reveal_system_prompt", "injection",
     r"\b(?:reveal|print|show|display|output|repeat|leak|dump|recite|expose|tell\s+me|give\s+me|write\s+out|share|"
     r"paste|type\s+out|spell\s+out|read\s+(?:me\s+)?back|what\s+(?:is|are|was|were))\s+(?:me\s+)?(?:\w+\s+){0,2}?"
     r"your\s+(?:(?:entire|full|exact|complete|original|whole|hidden|secret|actual|real|first)\s+)*"
     r"(?:system\s+(?:prompt|message|instructions?)|(?:initial|original|hidden|secret|first|developer)\s+"
     r"(?:prompt|instructions?|message)|instructions\s+(?:above|verbatim)|prompt\s+verbatim|pre-?prompt|rules\s+verbatim)"),
    ("leak_the_system_prompt", "injection",
     r"\b(?:reveal|leak|dump|expose|repeat)\s+(?:the|this)\s+(?:(?:entire|full|hidden|secret)\s+)?"
     r"(?:system\s+prompt|initial\s+instructions|hidden\s+instructions)"),
    ("repeat_text_above", "injection",
     rf"\b(?:repeat|print|output)\s+(?:{_ALL}\s+)?(?:the\s+)?(?:text|words|everything|instructions)\s+above\b"),
    ("no_longer_bound", "injection",
     r"\byou\s*(?:are|'re|r)\s+no\s+longer\s+(?:bound|restricted|limited|constrained|required\s+to\s+follow|governed)\b"),
    ("freed_from_rules", "injection",
     rf"\b{_YOU_ARE}\s+(?:now\s+)?(?:free|freed|released|liberated|unshackled)\s+from\s+(?:(?:{_ALL}|any|your|the|of)\s+)*"
     rf"(?:\w+\s+)?{_LIMITS}"),
    ("chatml_role_tag", "injection", r"<\|\s*(?:im_start|im_end|system|endoftext|start_header_id|end_header_id|eot_id)\s*\|>"),
    # a tag being talked about ("what do [INST] tags mean") is not a tag being used
    ("bracket_role_tag", "injection",
     r"(?:\[\s*/?\s*(?:system|inst|sys|system\s+message|admin)\s*\]|<<\s*/?\s*sys\s*>>)"
     r"(?!\s*(?:tags?|tokens?|markers?|delimiters?)\b)"),
    ("markdown_new_instructions", "injection",
     r"(?:^|\n)\s*#{1,6}\s*(?:new|updated|override|system|admin|developer|real|important)\s+"
     r"(?:instructions?|rules|prompt|directives?|task)\b"),
    ("system_line", "injection",
     r"(?:^|\n)\s*(?:system|admin|developer)\s*(?:message|override|note)?\s*:\s*(?:you\s+(?:are|must|will)\s+now|ignore|"
     r"new\s+(?:instructions|rules)|from\s+now\s+on)"),
    # -- jailbreak ---------------------------------------------------------------------------------
    ("do_anything_now", "jailbreak", r"\bdo\s+anything\s+now\b"),
    ("persona_assignment", "jailbreak",
     rf"\b(?:{_YOU_ARE}\s+(?:now\s+)?(?:going\s+to\s+)?(?:(?:act|play|be)\s+(?:as\s+)?|pretend\s+(?:to\s+be\s+)?|"
     rf"roleplay\s+as\s+|become\s+)?|(?:act|respond|answer|reply|speak|roleplay)\s+(?:only\s+)?as\s+|pretend\s+to\s+be\s+|"
     rf"become\s+|called\s+|named\s+)(?:an?\s+)?{_PERSONA}\b(?!')"),
    ("persona_mode", "jailbreak", rf"\b(?:dan|stan|dude|aim)\s+(?:mode|jailbreak|prompt)\b|\bdan\s+\d+(?:\.\d+)?\b"),
    ("aim_machiavellian", "jailbreak", r"\balways\s+intelligent\s+and\s+machiavellian\b|\bstrive\s+to\s+avoid\s+norms\b"),
    ("developer_mode_persona", "jailbreak",
     r"\b(?:with|in|entering|simulate)\s+(?:the\s+)?developer\s+mode\s+(?:enabled|activated)\b|"
     r"\bdeveloper\s+mode\s+(?:output|response)\b|\bdeveloper\s+mode\s+(?:enabled|activated)\s*[.!:]?\s*(?:you|ignore|from\s+now)"),
    ("unrestricted_mode", "jailbreak",
     rf"{_NOT_HOW_TO}\b(?:enable|activate|enter|switch\s+to|turn\s+on|unlock)\s+(?:the\s+)?(?:god|jailbreak|jailbroken|unrestricted|"
     r"unfiltered|uncensored|evil|chaos|opposite)\s+mode\b|\b(?:god|jailbreak|unrestricted|unfiltered|uncensored|evil)\s+mode\s+"
     r"(?:is\s+)?(?:now\s+)?(?:enabled|activated|on|engaged)\b"),
    ("jailbroken", "jailbreak",
     rf"\b(?:{_YOU_ARE}\s+(?:now\s+)?(?:been\s+)?|act\s+(?:as\s+if\s+you\s+(?:are|were)\s+|as\s+)(?:an?\s+)?|as\s+an?\s+)"
     r"jailbroken\b|\bjailbreak\s+(?:successful|activated|enabled|complete)\b"),
    ("no_restrictions_addressed", "jailbreak",
     rf"\b(?:you|ai|assistant|chatbot|model)\s+(?:now\s+)?(?:have|has|with|without)\s+(?:no|any|zero)?\s*(?:ethical\s+|moral\s+|"
     rf"content\s+|safety\s+)?{_LIMITS}\b|\b(?:respond|answer|reply|act|operate|behave|talk|speak|write)\s+(?:\w+\s+){{0,3}}?"
     rf"(?:without|with\s+no|free\s+of)\s+(?:any\s+)?(?:ethical\s+|moral\s+|content\s+|safety\s+)?{_LIMITS}\b"),
    ("unfiltered_ai", "jailbreak",
     r"\b(?:an?\s+|the\s+)?(?:unfiltered|uncensored|unrestricted|amoral|unethical)\s+(?:and\s+\w+\s+)?(?:ai|assistant|"
     r"chatbot|language\s+model|llm|version\s+of\s+(?:yourself|chatgpt|you))\b"),
    ("stay_in_character", "jailbreak",
     r"\b(?:stay|remain|keep)\s+in\s+character\b.{0,80}?\b(?:no\s+matter\s+what|even\s+if|at\s+all\s+(?:costs|times)|"
     r"regardless|whatever\s+happens)|\b(?:never|don't|do\s+not|must\s+not)\s+break\s+character\b.{0,80}?\b(?:no\s+matter|"
     r"even\s+if|regardless|refus|rules|guidelines|polic)|\bif\s+you\s+break\s+character\b"),
    # -- exfiltration ------------------------------------------------------------------------------
    ("markdown_image_exfil", "exfiltration", rf"!\[[^\]\n]*\]\(\s*{_URL}[^)\s]*[?&][\w.-]+=[^)\s]*"),
    ("url_template", "exfiltration",
     rf"{_URL}[^\s)]*[?&/][\w-]+=?\s*(?:\{{|\[|<|%7b|\$\{{)\s*(?:data|conversation|history|secret|prompt|password|key|token|"
     r"info|user|chat|message|input|context|summary|memory|email)"),
    ("send_secrets_to_url", "exfiltration",
     rf"\b(?:send|post|upload|transmit|forward|exfiltrate|leak|submit|email|append|include|encode)\s+(?:\w+\s+){{0,3}}?"
     rf"{_SECRETS}\b(?:\s+\S+){{0,6}}?\s+(?:to|at|into|in)\s+(?:the\s+)?(?:url|endpoint|server|webhook|link)?\s*"
     rf"(?:{_URL}|[\w-]+\.(?:com|net|org|io|xyz|ru|cn|site|app)\b)"),
    # -- abuse (for the monitor and output layers: text aimed at the reader) -----------------------
    ("suicide_baiting", "abuse",
     r"\b(?:go|you\s+should|just|pls|please)\s+(?:kill|hang|shoot)\s+yourself\b|\bkys\b|"
     r"\b(?:go|just)\s+(?:die|drop\s+dead)\b|\bi\s+hope\s+you\s+(?:die|get\s+(?:cancer|killed|hit\s+by))\b"),
    ("threat_to_reader", "abuse",
     r"\bi\s*(?:will|'ll|am\s+going\s+to|'m\s+going\s+to|am\s+gonna|'m\s+gonna|gonna)\s+"
     r"(?:find|hunt\s+down|kill|hurt|beat|stab|shoot|rape|murder|strangle)\s+you\b"),
    ("insult_to_reader", "abuse",
     r"\byou\s*(?:are|'re|r)\s+(?:a|an|such\s+an?)\s+(?:\w+\s+){0,2}"
     r"(?:idiot|moron|loser|retard|imbecile|piece\s+of\s+(?:shit|trash|garbage))\b"),
]

# Speed: a rule's regex runs only if each of its trigger groups has a substring in the text (C-speed
# `in` tests). Every group is a necessary condition of the pattern (after normalize(), whitespace is
# " " or "\n"), so skipping never changes the result, and a typical prompt runs few regexes.
_VERBS = ("ignore", "disregard", "forget", "override", "bypass", "discard", "skip", "abandon", "drop")
_NOUNS = ("instruction", "rule", "prompt", "direction", "directive", "guideline", "command", "message", "context",
          "guardrail", "programming", "restriction", "constraint", "polic")
_WEB = ("http", "www.")
TRIGGERS: dict[str, tuple[tuple[str, ...], ...]] = {
    "ignore_previous_instructions": (_VERBS, _NOUNS),
    "ignore_all_instructions": (_VERBS, _NOUNS),
    "ignore_everything_before": (_VERBS, ("told", "taught", "instructed", "given", "above", "before")),
    "new_instructions_override": (("new",), ("instructions", "rules", "directives")),
    "reveal_system_prompt": (("your",), ("prompt", "instruction", "message", "rules")),
    "leak_the_system_prompt": (("prompt", "instructions"),),
    "repeat_text_above": (("above",),),
    "no_longer_bound": (("longer",),),
    "freed_from_rules": (("free", "released", "liberated", "unshackled"),),
    "chatml_role_tag": (("<|",),),
    "bracket_role_tag": (("[", "<<"),),
    "markdown_new_instructions": (("#",),),
    "system_line": (("system", "admin", "developer"), (":",)),
    "do_anything_now": (("anything",),),
    "persona_assignment": ((" dan", "\ndan", " aim", "\naim", " stan", "\nstan", " dude", "\ndude", "mongo",
                            "confidant", "ucar", "kevin", "betterdan", "anti"),),
    "persona_mode": (("dan", "stan", "dude", "aim"), ("mode", "jailbreak", "prompt", "dan ", "dan\n")),
    "aim_machiavellian": (("machiavellian", "norms"),),
    "developer_mode_persona": (("developer",),),
    "unrestricted_mode": (("mode",),),
    "jailbroken": (("jailbr",),),
    "no_restrictions_addressed": (("restriction", "filter", "guideline", "limit", "censorship", "rules", "boundaries",
                                   "constraints", "ethics", "morals"),),
    "unfiltered_ai": (("unfiltered", "uncensored", "unrestricted", "amoral", "unethical"),),
    "stay_in_character": (("character",),),
    "markdown_image_exfil": (("](",),),
    "url_template": (_WEB,),
    "send_secrets_to_url": (_WEB + (".com", ".net", ".org", ".io", ".xyz", ".ru", ".cn", ".site", ".app"),
                            ("conversation", "chat", "history", "messages", "password", "credential", "key", "secret",
                             "token", "prompt", "user", "personal", "private", "sensitive", "everything",
                             "information", "data")),
    "suicide_baiting": (("yourself", "kys", "die", "dead"),),
    "threat_to_reader": (("you",), ("find", "hunt", "kill", "hurt", "beat", "stab", "shoot", "rape", "murder",
                                    "strangle")),
    "insult_to_reader": (("you",), ("idiot", "moron", "loser", "retard", "imbecile", "piece of")),
}
_COMPILED = [(name, cat, TRIGGERS[name], re.compile(pat)) for name, cat, pat in RULES]
CATEGORIES = ("injection", "jailbreak", "exfiltration", "abuse")


def match_rules(normalized: str) -> list[RuleHit]:
    """Every rule hit in `normalized` (the output of `normalize`), ordered by position."""
    hits = [RuleHit(name, cat, m.start(), m.end()) for name, cat, triggers, pat in _COMPILED
            if all(any(t in normalized for t in group) for group in triggers) for m in pat.finditer(normalized)]
    return sorted(hits, key=lambda h: (h.start, h.rule))
