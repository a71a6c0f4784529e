"""Ground-truth rewards for the sentiment experiment, one per scale. Each maps texts to floats.

paper   siebert/sentiment-roberta-large-english: the probability of the POSITIVE class (not its logit:
        the paper's Fig. 2 plots rewards in [0, 1]).
laptop  VADER's compound score in [-1, 1] (vaderSentiment: a lexicon, offline, no weights).
smoke   toy_reward: the share of the completion's characters that are vowels — a documented stand-in
        that a tiny random byte-level model can learn to raise; it measures nothing about sentiment.
"""

from __future__ import annotations

import torch

VOWELS = set("aeiouAEIOU")


def toy_reward(texts):
    """Share of characters that are vowels (0 for an empty text)."""
    return [sum(c in VOWELS for c in t) / len(t) if t else 0.0 for t in texts]


class VaderReward:
    """VADER's compound sentiment score, in [-1, 1]."""

    def __init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        self.analyzer = SentimentIntensityAnalyzer()

    def __call__(self, texts):
        return [self.analyzer.polarity_scores(t)["compound"] for t in texts]

    def lexicon_share(self, texts):
        """The share of each text's words that are VADER lexicon words: how a policy can game this reward, by
        stuffing sentiment words ("amazing amazing awesome") rather than writing a positive review."""
        shares = []
        for text in texts:
            words = [w.strip(".,!?;:\"'()").lower() for w in text.split()]
            shares.append(sum(w in self.analyzer.lexicon for w in words) / len(words) if words else 0.0)
        return shares


class ClassifierReward:
    """P(positive) from a Hugging Face sequence classifier (the paper: siebert/sentiment-roberta-large-english)."""

    def __init__(self, name="siebert/sentiment-roberta-large-english", device="cpu", batch_size=32,
                 positive_label="POSITIVE"):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        self.tokenizer = AutoTokenizer.from_pretrained(name)
        self.model = AutoModelForSequenceClassification.from_pretrained(name).to(device).eval()
        label2id = {k.upper(): v for k, v in self.model.config.label2id.items()}
        self.positive = label2id.get(positive_label.upper(), self.model.config.num_labels - 1)
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def __call__(self, texts):
        scores = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                                 truncation=True, max_length=512).to(self.device)
            scores += self.model(**enc).logits.float().softmax(-1)[:, self.positive].tolist()
        return scores
