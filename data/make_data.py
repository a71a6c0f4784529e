"""Write the small bundled data sets in minidpo/bundled/ (run: python data/make_data.py).

Every data file there is written by this script from the templates below, seeded, so it is reproducible
and holds no downloaded text. The preferences are deliberately easy to learn (a helpful, specific
response against an unhelpful one), so that a few minutes of DPO on a CPU show a real effect; they
are for smoke tests and laptop demos, not for measuring a model.
"""

import json
import os
import random

BUNDLED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "minidpo", "bundled")

# (request, first step, second step, tip): the substance of a helpful answer.
TASKS = [
    ("boil an egg", "put the egg in a pot of cold water and bring it to a boil",
     "let it simmer for nine minutes, then cool it in cold water", "Older eggs are easier to peel."),
    ("make a cup of tea", "heat fresh water until it just boils",
     "steep the tea for three to five minutes, then remove the leaves", "Warm the cup first."),
    ("start running", "begin with twenty minutes of alternating walking and jogging",
     "add a few minutes of jogging each week", "Good shoes matter more than speed."),
    ("save money each month", "write down every expense for one month",
     "set up an automatic transfer to savings on payday", "Cancel subscriptions you forgot about."),
    ("learn a new language", "practise fifteen minutes every day with a flashcard app",
     "speak with a native speaker once a week", "Mistakes are how you learn."),
    ("grow tomatoes", "plant them in a sunny spot after the last frost",
     "water deeply twice a week and tie the stems to a stake", "Pinch off the side shoots."),
    ("write a cover letter", "open with the job title and why it interests you",
     "give two concrete examples of your relevant work", "Keep it under one page."),
    ("fall asleep faster", "go to bed at the same time every night",
     "keep screens out of the bedroom for the last hour", "A cool, dark room helps."),
    ("clean a cast iron pan", "rinse it with hot water and scrub with a brush",
     "dry it on the stove and rub in a thin layer of oil", "Avoid soaking it."),
    ("prepare for a job interview", "research the company and the role",
     "practise answering common questions out loud", "Prepare two questions to ask them."),
    ("reverse a list in Python", "use slicing: my_list[::-1] returns a reversed copy",
     "or call my_list.reverse() to reverse it in place", "reversed() gives an iterator."),
    ("change a flat tyre", "loosen the wheel nuts, then jack up the car",
     "swap in the spare and tighten the nuts in a star pattern", "Check the spare's pressure."),
    ("bake bread", "mix flour, water, yeast and salt and knead for ten minutes",
     "let it rise until doubled, shape it and bake at 220 degrees", "Steam makes a better crust."),
    ("meditate", "sit comfortably and focus on your breathing",
     "when your mind wanders, gently return to the breath", "Start with five minutes."),
    ("keep houseplants alive", "check the soil before watering, not the calendar",
     "give each plant the light its label asks for", "Most plants die from overwatering."),
    ("write a good commit message", "summarise the change in one short line",
     "explain why the change was needed in the body", "Use the imperative mood."),
    ("make friends in a new city", "join a club or class around a hobby you enjoy",
     "say yes to invitations, even small ones", "Regular contact builds friendships."),
    ("study for an exam", "make a schedule that covers every topic",
     "test yourself with past papers instead of rereading", "Sleep well the night before."),
    ("stop procrastinating", "break the task into steps of ten minutes",
     "start with the smallest step right now", "Remove distractions from your desk."),
    ("paint a room", "wash the walls and tape the edges",
     "apply a primer, then two thin coats of paint", "Keep a wet edge to avoid streaks."),
    ("brew coffee with a French press", "use one part coarse coffee to fifteen parts water",
     "steep for four minutes, then press slowly", "Serve it at once so it does not turn bitter."),
    ("back up my photos", "copy them to an external drive",
     "keep a second copy in cloud storage", "Test that you can restore them."),
    ("lower my electricity bill", "switch to LED bulbs",
     "unplug devices on standby and wash clothes at lower temperatures", "Compare tariffs yearly."),
    ("train a puppy to sit", "hold a treat above its nose and move it back",
     "say 'sit' and reward it the moment it sits", "Keep sessions short and happy."),
    ("read more books", "carry a book with you everywhere",
     "read twenty pages before bed instead of scrolling", "Quit books you do not enjoy."),
    ("give a presentation", "structure it around three key points",
     "rehearse it aloud at least twice", "Look at people, not your slides."),
    ("make pancakes", "whisk flour, milk, eggs and a pinch of salt",
     "cook ladlefuls in a hot buttered pan until bubbles form, then flip", "Rest the batter."),
    ("fix a squeaky door", "lift the hinge pins out one at a time",
     "coat them with a little oil and put them back", "Wipe off the excess."),
    ("plan a trip on a budget", "travel outside the peak season",
     "book accommodation with a kitchen and cook some meals", "Set a daily spending limit."),
    ("improve my posture", "set your screen at eye level",
     "stand up and stretch every half hour", "Strengthen your back with simple exercises."),
]
QUESTION = ["How do I {t}?", "Can you tell me how to {t}?", "What is the best way to {t}?",
            "I want to {t}. Where do I start?", "Any advice on how to {t}?", "Please explain how to {t}."]
HELPFUL = ["Sure! To {t}, first {a}. Then {b}. {tip}",
           "Happy to help. Start by making sure you {a}; after that, {b}. {tip}",
           "Here is a simple way to {t}: {a}, and then {b}. {tip}",
           "Good question. Step one: {a}. Step two: {b}. {tip}"]
UNHELPFUL = ["I don't know. Figure it out yourself.", "Why would you even want to {t}? That's a waste of time.",
             "Just search the internet.", "No.", "That's not my problem.",
             "Ugh, everyone asks that. Whatever.", "I can't be bothered to explain how to {t}.",
             "You should already know how to {t}."]
FOLLOW_UP = [("Thanks! How long does it take?", "It depends, but most people see progress within a few weeks."),
             ("Is it hard?", "Not really; it gets easier with a little practice."),
             ("Do I need any special equipment?", "No, the basics you already have at home are enough.")]


def turn(question, answer=None):
    text = f"\n\nHuman: {question}\n\nAssistant:"
    return text if answer is None else f"{text} {answer}"


def dialogue_pairs(rng, n):
    """(history, question, helpful answer, unhelpful answer) for n dialogues, a third multi-turn."""
    out = []
    for i in range(n):
        t, a, b, tip = TASKS[i % len(TASKS)]
        question = rng.choice(QUESTION).format(t=t)
        helpful = rng.choice(HELPFUL).format(t=t, a=a, b=b, tip=tip)
        unhelpful = rng.choice(UNHELPFUL).format(t=t)
        history = ""
        if i % 3 == 2:  # multi-turn: an earlier exchange is part of the prompt
            follow_q, follow_a = rng.choice(FOLLOW_UP)
            history = turn(question, rng.choice(HELPFUL).format(t=t, a=a, b=b, tip=tip))
            question, helpful = follow_q, follow_a
            unhelpful = rng.choice(UNHELPFUL[:6]).format(t=t)
        out.append((history, question, helpful, unhelpful))
    return out


def write_jsonl(name, rows):
    with open(os.path.join(BUNDLED, name), "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def make_preferences(rng, n=320):
    """Generic format (prompt, chosen, rejected): the default run's data."""
    rows = []
    for history, question, helpful, unhelpful in dialogue_pairs(rng, n):
        rows.append({"prompt": history + turn(question), "chosen": " " + helpful, "rejected": " " + unhelpful})
    write_jsonl("preferences.jsonl", rows)


def make_hh(rng, n=240):
    """Anthropic/hh-rlhf schema: only 'chosen' and 'rejected', each a full transcript."""
    rows = []
    for history, question, helpful, unhelpful in dialogue_pairs(rng, n):
        rows.append({"chosen": history + turn(question, helpful), "rejected": history + turn(question, unhelpful)})
    write_jsonl("hh.jsonl", rows)


# (subreddit, title, situation, detail, question, faithful summary, unfaithful summary)
POSTS = [
    ("relationships", "My roommate never cleans up", "my roommate leaves dirty dishes everywhere",
     "I have asked politely three times and nothing changed.", "How do I bring it up without a fight?",
     "roommate never does dishes despite asking, how to talk about it calmly?", "I love my new apartment."),
    ("personalfinance", "Should I pay off my car or invest?", "I have 8k left on a car loan at 3%",
     "I also have some savings sitting in a normal account.", "Is it better to pay the loan or invest the money?",
     "small car loan at low interest, pay it off or invest savings?", "my car broke down yesterday."),
    ("AskReddit", "Moving abroad for a job offer", "I got a job offer in another country",
     "The pay is better but I would leave my family and friends.", "Has anyone done this and regretted it?",
     "got a better paid job abroad, worried about leaving family, any regrets?", "I hate my current job."),
    ("fitness", "Plateau after six months of lifting", "my bench press has not improved in two months",
     "I train four times a week and eat enough protein.", "What should I change?",
     "bench press stuck for two months despite training and diet, what to change?", "I started running."),
    ("cooking", "My bread never rises", "every loaf I bake comes out flat and dense",
     "I follow the recipe exactly and my yeast is new.", "What am I doing wrong?",
     "bread comes out flat even with new yeast and a recipe, why?", "I made great pasta last night."),
    ("legaladvice", "Landlord keeping my deposit", "my landlord refuses to return my deposit",
     "I left the flat spotless and have photos to prove it.", "What can I do?",
     "landlord won't return deposit although flat was clean and documented, options?",
     "my landlord is nice."),
    ("cats", "Cat suddenly stopped eating", "my cat has not eaten properly for two days",
     "She is still drinking water but sleeps more than usual.", "Should I go to the vet now?",
     "cat barely eating for two days and sleeping more, go to the vet?", "my cat loves her new toy."),
    ("careerguidance", "Switching from teaching to software", "I have taught maths for ten years",
     "I have been learning programming in the evenings for a year.", "Is it realistic to switch careers at 35?",
     "maths teacher learning to code for a year, can I switch careers at 35?",
     "teaching is easy and I want to stay."),
    ("travel", "First solo trip to Japan", "I am planning my first solo trip, to Japan",
     "I only have ten days and a limited budget.", "Which cities should I prioritise?",
     "first solo trip to Japan, ten days, small budget, which cities?", "I went to France last year."),
    ("parenting", "Toddler refuses to sleep in own bed", "our three year old will not sleep in her own bed",
     "She cries for hours unless one of us stays with her.", "How did you handle this?",
     "three year old cries unless we stay, how to get her to sleep alone?", "my toddler loves broccoli."),
    ("gardening", "Tomato leaves turning yellow", "the lower leaves of my tomato plants are turning yellow",
     "I water them every day and they get full sun.", "Is this a disease?",
     "tomato leaves yellowing despite sun and daily watering, disease?", "my roses are doing well."),
    ("buildapc", "PC restarts when gaming", "my PC restarts whenever I start a game",
     "Temperatures look fine and the power supply is 550W.", "Could it be the power supply?",
     "PC restarts under gaming load with normal temps, is the 550W PSU too weak?",
     "I bought a new keyboard."),
]
AGES = ["22M", "25F", "29M", "31F", "34M", "40F"]
DURATIONS = ["a few weeks", "three months", "half a year", "about a year"]


def make_tldr(rng, n=240):
    """openai/summarize_from_feedback, "comparisons" config: info, summaries, choice, ..."""
    rows = []
    for i in range(n):
        sub, title, situation, detail, question, good, bad = POSTS[i % len(POSTS)]
        post = (f"Throwaway account. I ({rng.choice(AGES)}) have a problem: {situation}, "
                f"and it has been going on for {rng.choice(DURATIONS)}. {detail} {question}")
        summaries = [{"text": " " + good, "policy": "ref", "note": None},
                     {"text": " " + bad, "policy": "sup2", "note": None}]
        choice = 0
        if rng.random() < 0.5:  # put the preferred summary second half of the time: choice = 1
            summaries.reverse()
            choice = 1
        rows.append({"info": {"id": f"t3_{i:05x}", "post": post, "title": title, "subreddit": sub,
                              "site": None, "article": None},
                     "summaries": summaries, "choice": choice, "worker": f"w{i % 7}",
                     "batch": "batch0", "split": "train", "extra": {"confidence": 1 + i % 9}})
    write_jsonl("tldr.jsonl", rows)


SUBJECTS = ["This movie", "This film", "The acting in this movie", "The plot", "The story", "The soundtrack",
            "The cast", "The characters", "The ending of this movie", "This sequel", "The special effects",
            "The first half hour", "The director", "This documentary", "The script", "The dialogue",
            "The camera work", "This remake", "The lead actress", "The villain"]
VERBS = ["", "was", "is", "really", "made me", "turned out to be", "left me", "felt", "seemed", "was so"]
OPENINGS = ["I watched this", "I rented this movie", "My wife and I saw", "I went to see this", "When I first saw this",
            "I have to say that", "Honestly, this", "I expected", "After reading the reviews", "From the opening scene",
            "As a fan of the book,", "I really wanted to like", "Watching this film", "It's been years since",
            "I saw this movie", "Last night I watched"]


def make_imdb_prefixes(rng, n=240):
    """Movie-review openings of 2-8 words (a subject and maybe a verb, or a first-person opening): the
    offline prompts of the sentiment experiment. Neutral on purpose: the sentiment is the completion's."""
    combos = sorted(c for c in {f"{o} {v}".strip() for o in SUBJECTS for v in VERBS} | set(OPENINGS)
                    if len(c.split()) <= 8)
    rng.shuffle(combos)
    with open(os.path.join(BUNDLED, "imdb_prefixes.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(combos[:n]) + "\n")


if __name__ == "__main__":
    make_preferences(random.Random(0))
    make_hh(random.Random(1))
    make_tldr(random.Random(2))
    make_imdb_prefixes(random.Random(3))
    print("wrote", sorted(n for n in os.listdir(BUNDLED) if n.endswith((".jsonl", ".txt"))))
