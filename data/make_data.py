"""Write the small bundled data sets in minidpo/bundled/ (run: python data/make_data.py).

Every data file there is written by this script from the templates below, seeded, so it is reproducible
byte for byte and holds no downloaded text. They are for smoke tests, CI and laptop demos, not for
measuring a model.

- preferences.jsonl: easy on purpose (a helpful, specific response against a dismissive one), so that a
  few minutes of DPO on a CPU show a real effect.
- hh*.jsonl, tldr*.jsonl: a train and a test split that share no topic, no prompt and no response
  template (a frame such as "Sure! To {t}, first {a}. ..." with its slots empty), so that a model cannot
  win on the test split by copying training answers; the pairs compare responses of five levels of
  quality, not only helpful against dismissive.
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


def jsonl(rows):
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def make_preferences(rng, n=320):
    """Generic format (prompt, chosen, rejected): the default run's data."""
    rows = []
    for history, question, helpful, unhelpful in dialogue_pairs(rng, n):
        rows.append({"prompt": history + turn(question), "chosen": " " + helpful, "rejected": " " + unhelpful})
    return jsonl(rows)


def cap(text):
    return text[:1].upper() + text[1:]


# ---- Anthropic HH: hh.jsonl (train) and hh_test.jsonl (test) ---------------------------------------

# Topics of the test split only: (request, first step, second step, tip), as TASKS (the training topics).
HH_TEST_TASKS = [
    ("iron a shirt", "start with the collar and cuffs while the iron heats up",
     "press the sleeves, then the back and the two front panels", "A damp cloth stops shiny marks."),
    ("sharpen a kitchen knife", "soak a whetstone for ten minutes",
     "draw the blade across it at a steady fifteen degree angle, ten strokes a side", "Hone it weekly."),
    ("write a thank-you note", "name the gift or favour in the first sentence",
     "say how you used it or what it meant to you", "Send it within a week."),
    ("unclog a sink", "pour a kettle of hot water down the drain",
     "use a plunger with a tight seal, or clean out the trap underneath", "Keep a strainer in the plughole."),
    ("pack a suitcase", "roll your clothes instead of folding them",
     "put shoes and heavy items at the wheel end", "Lay out everything first and take half."),
    ("learn to juggle", "practise throwing one ball in an arc from hand to hand",
     "add a second ball, throwing it when the first reaches its peak", "Stand in front of a bed."),
    ("negotiate a raise", "collect the results you delivered this year",
     "ask for a specific figure, backed by what the market pays", "Let them answer first."),
    ("remove a red wine stain", "blot the stain at once without rubbing",
     "cover it with salt or soda water, then wash it cold", "Never use hot water on it."),
    ("set up a home budget", "list your monthly income and fixed costs",
     "give every remaining pound a job: savings, food, fun", "Review it at the end of each month."),
    ("make a paper airplane", "fold a sheet in half lengthways and fold the top corners to the crease",
     "fold the new edges to the centre again, then fold down the wings", "Throw it gently and level."),
    ("speed up an old laptop", "uninstall programs you no longer use",
     "stop apps from starting at boot and swap the hard disk for an SSD", "More memory helps too."),
    ("care for a sourdough starter", "feed it equal weights of flour and water every day",
     "discard half before each feeding", "Keep it in the fridge if you bake weekly."),
    ("calm down before an exam", "breathe in for four counts and out for six",
     "read every question once before you answer any", "Arrive early so you are not rushed."),
    ("tie a tie", "drape it so the wide end hangs lower and cross it over the narrow end",
     "wrap it around, pull it up through the neck loop and down through the knot", "Dimple it under the knot."),
    ("choose a bicycle", "decide whether you will ride on roads, trails or both",
     "test-ride a frame in your size before you buy", "Budget for a helmet and a lock."),
    ("memorise a speech", "learn it one paragraph at a time",
     "record yourself and listen while you walk", "Memorise the first and last lines word for word."),
]
HH_TOPICS = {"train": TASKS, "test": HH_TEST_TASKS}

# Response frames by quality, per split: no frame appears in both. Slots: {t} request, {a} {A} first step
# (lower / capitalised), {b} second step, {tip} tip. An off-topic response is a complete frame filled with
# another topic of the same split.
HH_FRAMES = {
    "train": {
        "question": QUESTION + ["Do you know how to {t}?"],
        "complete": HELPFUL + ["To {t}, {a}, then {b}. {tip}", "{A}. Once that is done, {b}. {tip} Good luck!"],
        "partial": ["{A}. That should get you started.", "Try this: {b}.", "The main thing is to {t} slowly."],
        "vague": ["There are lots of ways to {t}; it depends on your situation.",
                  "It takes practice. Just keep trying and you will get there.",
                  "People have different opinions about how to {t}. Do what feels right."],
        "dismissive": UNHELPFUL,
        "follow_up": FOLLOW_UP + [("What if it goes wrong?", "Then start again slowly; the second try is easier.")],
    },
    "test": {
        "question": ["Could you walk me through how to {t}?", "What steps should I follow to {t}?",
                     "I have never tried to {t}. What do I do?", "Is there a simple method to {t}?"],
        "complete": ["Of course. The key steps are: {a}; next, {b}. One more tip: {tip}",
                     "You can do it in two steps. 1) {A}. 2) {b}. {tip}",
                     "Glad you asked! Begin by making sure to {a}, and afterwards {b}. Also: {tip}"],
        "partial": ["Well, you could {a}. I am not sure about the rest.", "Mainly, {b}."],
        "vague": ["Everyone has their own approach to this. Read up on it and see what works.",
                  "Honestly it is not that complicated once you get the hang of it."],
        "dismissive": ["Not interested in helping with that.", "Look, I have better things to do.",
                       "Ask someone else about how to {t}."],
        "follow_up": [("How often should I do it?", "Once a week is plenty at the start; more once it feels easy."),
                      ("Can a beginner manage it?", "Yes. Go slowly the first time and it will come out fine.")],
    },
}
# (chosen quality, rejected quality) of a single-turn pair, drawn with these repeats as weights.
HH_PAIRS = ([("complete", "dismissive")] * 3 + [("complete", "off_topic")] * 2 + [("complete", "vague")] * 2
            + [("complete", "partial"), ("partial", "dismissive"), ("partial", "off_topic"), ("partial", "vague"),
               ("vague", "dismissive")])


def hh_response(rng, quality, task, split):
    frames = HH_FRAMES[split]
    if quality == "off_topic":
        task = rng.choice([other for other in HH_TOPICS[split] if other != task])
    t, a, b, tip = task
    frame = rng.choice(frames["complete" if quality == "off_topic" else quality])
    return frame.format(t=t, a=a, A=cap(a), b=b, tip=tip)


def hh_dialogues(rng, split, n):
    """n (chosen, rejected) transcripts of one split; every third is multi-turn. The single-turn prompts
    run through every (topic, question) combination of the split in a seeded order before any repeats."""
    tasks, frames = HH_TOPICS[split], HH_FRAMES[split]
    combos = [(task, question) for task in tasks for question in frames["question"]]
    rng.shuffle(combos)
    rows, single = [], 0
    for i in range(n):
        if i % 3 == 2:  # multi-turn: a complete first answer, then a follow-up question
            task = tasks[i % len(tasks)]
            first = turn(rng.choice(frames["question"]).format(t=task[0]), hh_response(rng, "complete", task, split))
            follow_q, follow_a = rng.choice(frames["follow_up"])
            rejected = hh_response(rng, rng.choice(["dismissive", "vague"]), task, split)
            prompt, chosen = first + turn(follow_q), follow_a
        else:
            task, question = combos[single % len(combos)]
            single += 1
            better, worse = rng.choice(HH_PAIRS)
            prompt = turn(question.format(t=task[0]))
            chosen, rejected = hh_response(rng, better, task, split), hh_response(rng, worse, task, split)
        rows.append({"chosen": f"{prompt} {chosen}", "rejected": f"{prompt} {rejected}"})
    return rows


def make_hh(rng, split, n):
    """Anthropic/hh-rlhf schema: only 'chosen' and 'rejected', each a full transcript."""
    return jsonl(hh_dialogues(rng, split, n))


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
POSTS += [
    ("dogs", "Dog barks at every noise", "my dog barks at every sound in the hallway",
     "The neighbours have started leaving notes on my door.", "How do I teach him to stay quiet?",
     "dog barks at every hallway noise and neighbours complain, how to train him out of it?",
     "my dog is very cute."),
    ("college", "Failing my first semester", "I am failing two of my four classes",
     "I work twenty hours a week and fall asleep in lectures.", "Should I drop a class or cut my hours?",
     "failing two classes while working 20 hours a week, drop a class or work less?",
     "the campus food is great."),
    ("homeimprovement", "Mould in the bathroom ceiling", "black mould keeps coming back on my bathroom ceiling",
     "I bleach it every month and it returns within weeks.", "Is this a ventilation problem?",
     "bathroom ceiling mould returns weeks after bleaching, is it ventilation?", "I painted the hallway blue."),
    ("running", "Knee pain after long runs", "my knee hurts after every run longer than ten kilometres",
     "Short runs are fine and the pain is gone the next day.", "Should I see a physio or change my shoes?",
     "knee hurts after runs over 10k but not short ones, physio or new shoes?", "I signed up for a marathon."),
]
# Posts of the test split only.
TLDR_TEST_POSTS = [
    ("relationship_advice", "Partner wants to move in too soon", "my partner wants us to move in together",
     "We have only been dating for four months and I like having my own space.", "How do I say not yet kindly?",
     "partner of four months wants to move in, I am not ready, how to say so kindly?",
     "we went hiking last weekend."),
    ("personalfinance", "Credit card debt from university", "I have 4k of credit card debt at 24% interest",
     "I just started my first full-time job and can pay about 300 a month.", "Debt first or emergency fund first?",
     "4k credit card debt at 24%, new job, pay it off first or build an emergency fund?",
     "I bought a nice coffee machine."),
    ("dogs", "Rescue dog afraid of men", "our rescue dog hides whenever a man enters the room",
     "She is fine with women and children and we have had her for two months.", "How can we help her trust men?",
     "rescue dog of two months hides from men but not women, how to build her trust?",
     "our garden has a new fence."),
    ("jobs", "Boss takes credit for my work", "my manager presents my reports as his own",
     "It happened again in a meeting with the directors last week.", "Do I confront him or go above him?",
     "manager keeps presenting my reports as his to directors, confront him or escalate?",
     "our office got new chairs."),
    ("cooking", "Rice always turns out mushy", "my rice is mushy and sticky every time",
     "I use a normal pot and the amount of water on the packet.", "What is the trick?",
     "rice comes out mushy with packet water amounts, how do I fix it?", "I love spicy food."),
    ("homeowners", "Neighbour's tree over my roof", "a branch from my neighbour's tree hangs over my roof",
     "Leaves block my gutters and one branch scrapes the tiles in the wind.", "Can I cut it back myself?",
     "neighbour's branch over my roof blocks gutters and scrapes tiles, may I cut it myself?",
     "we repainted the front door."),
    ("learnprogramming", "Stuck in tutorial hell", "I keep doing programming tutorials without building anything",
     "I have finished six courses but freeze when I open an empty editor.", "How do I start a real project?",
     "six courses done but can't build anything alone, how to start a real project?",
     "I bought a second monitor."),
    ("insomnia", "Waking up at 4am every night", "I wake up at 4am every night and cannot fall asleep again",
     "I do not drink coffee after noon and I go to bed at eleven.", "What else can I try?",
     "wake at 4am nightly despite no late coffee and a regular bedtime, what else to try?",
     "I had a funny dream once."),
]
TLDR_POSTS = {"train": POSTS, "test": TLDR_TEST_POSTS}
AGES = ["22M", "25F", "29M", "31F", "34M", "40F"]
DURATIONS = ["a few weeks", "three months", "half a year", "about a year"]
# Frames per split (none in both). Posts: {age}, {duration}, {situation} / {Situation} (capitalised), {detail},
# {question}. Summaries by quality: {good} the post's faithful summary, {situation}, {unrelated} its
# off-topic sentence; an off-topic summary is a faithful frame filled with another post of the split.
TLDR_FRAMES = {
    "train": {
        "post": ["Throwaway account. I ({age}) have a problem: {situation}, and it has been going on for {duration}. "
                 "{detail} {question}",
                 "Long time lurker, first post ({age}). {Situation}. This has been going on for {duration} now. "
                 "{detail} {question}",
                 "Some background: I am {age}. For {duration}, {situation}. {detail} {question}"],
        "faithful": ["{good}", "{good} ({duration} now)", "{age} here, {good}"],
        "partial": ["{situation}.", "basically, {situation} for {duration}."],
        "generic": ["need advice, long post.", "please read, I need help.", "not sure what to do here."],
        "unrelated": ["{unrelated}"],
    },
    "test": {
        "post": ["Sorry for the formatting, I am on mobile. So for {duration} {situation}. {detail} I am {age}. "
                 "{question}",
                 "Quick one. {Situation} ({duration} so far; I am {age}). {detail} {question}"],
        "faithful": ["short version: {good}", "{good} (been {duration})", "me ({age}): {good}"],
        "partial": ["so yeah, {situation}.", "{situation}, {duration} and counting."],
        "generic": ["any thoughts welcome.", "help me figure this out please."],
        "unrelated": ["{unrelated} Anyway."],
    },
}
TLDR_PAIRS = ([("faithful", "unrelated")] * 2 + [("faithful", "off_topic")] * 2 + [("faithful", "generic")] * 2
              + [("faithful", "partial"), ("partial", "generic"), ("partial", "off_topic"), ("partial", "unrelated"),
                 ("generic", "unrelated")])
TLDR_POLICIES = {"faithful": "ref", "partial": "sup2", "generic": "sup4", "off_topic": "sup4_6b",
                 "unrelated": "pretrain"}


def tldr_posts(rng, split, n):
    """n distinct (post fields, age, duration, post text) of one split, topics in turn."""
    posts, seen = [], set()
    for i in range(n):
        post = TLDR_POSTS[split][i % len(TLDR_POSTS[split])]
        while True:
            age, duration, frame = rng.choice(AGES), rng.choice(DURATIONS), rng.choice(TLDR_FRAMES[split]["post"])
            sub, title, situation, detail, question, good, unrelated = post
            text = frame.format(age=age, duration=duration, situation=situation, Situation=cap(situation),
                                detail=detail, question=question)
            if text not in seen:
                break
        seen.add(text)
        posts.append((post, age, duration, text))
    return posts


def tldr_summary(rng, quality, post, age, duration, split):
    if quality == "off_topic":
        post = rng.choice([other for other in TLDR_POSTS[split] if other != post])
    frame = rng.choice(TLDR_FRAMES[split]["faithful" if quality == "off_topic" else quality])
    sub, title, situation, detail, question, good, unrelated = post
    return frame.format(good=good, situation=situation, unrelated=unrelated, age=age, duration=duration)


def tldr_comparisons(rng, split, posts):
    """openai/summarize_from_feedback, "comparisons" config: info, summaries, choice, ... (the held-out rows
    carry split "valid1", as the hub's validation split does)."""
    rows = []
    for i, (post, age, duration, text) in enumerate(posts):
        sub, title = post[:2]
        better, worse = rng.choice(TLDR_PAIRS)
        summaries = [{"text": " " + tldr_summary(rng, quality, post, age, duration, split),
                      "policy": TLDR_POLICIES[quality], "note": None} for quality in (better, worse)]
        choice = 0
        if rng.random() < 0.5:  # put the preferred summary second half of the time: choice = 1
            summaries.reverse()
            choice = 1
        rows.append({"info": {"id": f"t3_{split[:2]}{i:04x}", "post": text, "title": title, "subreddit": sub,
                              "site": None, "article": None},
                     "summaries": summaries, "choice": choice, "worker": f"w{i % 7}",
                     "batch": "batch0", "split": "train" if split == "train" else "valid1",
                     "extra": {"confidence": 1 + i % 9}})
    return rows


def tldr_sft(rng, split, posts):
    """CarperAI/openai_summarize_tldr schema: prompt (the paper's TL;DR prompt) and label (a human-style
    reference summary: a faithful frame of the split)."""
    rows = []
    for post, age, duration, text in posts:
        sub, title = post[:2]
        rows.append({"prompt": f"SUBREDDIT: r/{sub}\nTITLE: {title}\nPOST: {text}\nTL;DR:",
                     "label": tldr_summary(rng, "faithful", post, age, duration, split)})
    return rows


def make_tldr(rng, split, n):
    """(comparisons, SFT rows) of one split, on the same n distinct posts."""
    posts = tldr_posts(rng, split, n)
    return jsonl(tldr_comparisons(rng, split, posts)), jsonl(tldr_sft(rng, split, posts))


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
    return "\n".join(combos[:n]) + "\n"


def bundled_files():
    """{file name: its text}: every bundled data file, each from its own seeded generator."""
    tldr, tldr_sft_train = make_tldr(random.Random(2), "train", 320)
    tldr_test, tldr_sft_test = make_tldr(random.Random(5), "test", 64)
    return {"preferences.jsonl": make_preferences(random.Random(0)),
            "hh.jsonl": make_hh(random.Random(1), "train", 320),
            "hh_test.jsonl": make_hh(random.Random(4), "test", 96),
            "tldr.jsonl": tldr, "tldr_test.jsonl": tldr_test,
            "tldr_sft.jsonl": tldr_sft_train, "tldr_sft_test.jsonl": tldr_sft_test,
            "imdb_prefixes.txt": make_imdb_prefixes(random.Random(3))}


def write_all(folder=BUNDLED):
    """Write every bundled file into folder; returns their names."""
    files = bundled_files()
    for name, text in files.items():
        with open(os.path.join(folder, name), "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
    return sorted(files)


if __name__ == "__main__":
    print("wrote", write_all())
