"""Prompt material generated from small word lists with a seeded RNG: no downloads, no data files.

Everything is deterministic given the `random.Random` passed in, so a load test is reproducible
(same seed → same prompts) while every user still sends different text.
"""
from __future__ import annotations

import random

FIRST_NAMES = ("Ada", "Bruno", "Chen", "Dalia", "Emeka", "Farah", "Goran", "Hana", "Ivan", "Jun",
               "Kofi", "Lena", "Mateo", "Noor", "Olga", "Pavel", "Quinn", "Rosa", "Sami", "Tara")
LAST_NAMES = ("Adeyemi", "Berg", "Costa", "Dubois", "Eriksen", "Fischer", "Garcia", "Haddad", "Ito",
              "Jensen", "Kowalski", "Lopez", "Moreau", "Novak", "Okafor", "Petrov", "Rossi", "Silva")
CITIES = ("Porto", "Lagos", "Osaka", "Tallinn", "Quito", "Leeds", "Lyon", "Pune", "Busan", "Graz",
          "Accra", "Bergen", "Cusco", "Dakar", "Hobart", "Izmir", "Kraków", "Malmö")
JOBS = ("nurse", "welder", "teacher", "pilot", "chemist", "baker", "architect", "librarian",
        "electrician", "translator", "surveyor", "pharmacist", "carpenter", "data analyst")
TOPICS = ("tide pools", "bridge design", "sourdough", "solar panels", "chess openings", "bees",
          "glaciers", "compilers", "violins", "coral reefs", "rail networks", "typography",
          "volcanoes", "cheese making", "kites", "lighthouses", "paper mills", "telescopes")
QUESTIONS = ("What is the most surprising fact about {t}?", "Explain {t} to a ten-year-old.",
             "Give three tips for someone new to {t}.", "Why do people care about {t}?",
             "Summarise the history of {t} in two sentences.", "What are common mistakes with {t}?",
             "Write a short poem about {t}.", "How would you start a small project on {t}?")
FOLLOW_UPS = ("Can you say more about that?", "Give an example.", "What would an expert add?",
              "Shorten that to one sentence.", "What is the opposite view?", "And why is that?",
              "How does that compare with {t}?", "List the key terms you used.")
_NOUNS = ("report", "survey", "engine", "harbour", "garden", "market", "river", "archive", "studio",
          "network", "council", "festival", "library", "factory", "station", "orchard")
_VERBS = ("measured", "described", "rebuilt", "inspected", "extended", "recorded", "compared",
          "reviewed", "moved", "painted", "tested", "published")
_ADJS = ("old", "quiet", "busy", "northern", "small", "famous", "careful", "new", "shared", "remote")


def person(rng: random.Random) -> dict:
    """One record for the extraction scenario; the prose and the expected JSON come from it."""
    return {"name": f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}", "age": rng.randint(19, 83),
            "city": rng.choice(CITIES), "occupation": rng.choice(JOBS)}


def person_prose(p: dict, rng: random.Random) -> str:
    templates = ("{name} is a {age}-year-old {occupation} who lives in {city}.",
                 "Living in {city}, {name} ({age}) has worked as a {occupation} for years.",
                 "Our new member, {name}, aged {age}, joins us from {city}, where they work as a {occupation}.")
    return rng.choice(templates).format(**p) + " " + sentence(rng)


def sentence(rng: random.Random) -> str:
    return (f"The {rng.choice(_ADJS)} {rng.choice(_NOUNS)} in {rng.choice(CITIES)} was "
            f"{rng.choice(_VERBS)} by a {rng.choice(JOBS)} who studies {rng.choice(TOPICS)}.")


def passage(rng: random.Random, num_chars: int) -> str:
    """Prose of about `num_chars` characters (never more), sentence by sentence."""
    parts: list[str] = []
    size = 0
    while True:
        s = sentence(rng)
        if size + len(s) + 1 > num_chars:
            break
        parts.append(s)
        size += len(s) + 1
    return " ".join(parts) if parts else sentence(rng)[:max(1, num_chars)]


def code_block(rng: random.Random, num_chars: int) -> str:
    """Python-like source of about `num_chars` characters: the copy-heavy scenario's material,
    repetitive enough that n-gram speculation has something to find."""
    lines: list[str] = []
    size = 0
    i = 0
    while size < num_chars:
        noun, verb = rng.choice(_NOUNS), rng.choice(_VERBS)
        block = [f"def {verb}_{noun}_{i}(items, limit={rng.randint(2, 64)}):",
                 f"    \"\"\"Return the {rng.choice(_ADJS)} {noun}s that were {verb}.\"\"\"",
                 f"    out = [x for x in items if x.{noun} is not None]",
                 "    return out[:limit]", ""]
        text = "\n".join(block)
        if lines and size + len(text) > num_chars:
            break
        lines.append(text)
        size += len(text) + 1
        i += 1
    return "\n".join(lines)


def question(rng: random.Random) -> str:
    return rng.choice(QUESTIONS).format(t=rng.choice(TOPICS))


def follow_up(rng: random.Random) -> str:
    return rng.choice(FOLLOW_UPS).format(t=rng.choice(TOPICS))


def system_prompt(num_chars: int) -> str:
    """The one long system prompt every user of the shared-prefix scenario sends (fixed seed, so all
    users and all runs share it byte for byte: that is what the prefix cache can reuse)."""
    rules = ("You are the help desk assistant of the Harbour City library network. Follow these rules. ")
    return rules + passage(random.Random(20261123), max(0, num_chars - len(rules)))
