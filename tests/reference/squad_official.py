#!/usr/bin/env python3
"""SQuAD v2's official scoring, as the oracle that Bessie's src/eval.rs is checked against (tests/eval.rs).

The functions between the two `----` lines are transcribed verbatim from the official evaluation script of
SQuAD 2.0, `evaluate-v2.0.py` ("Official evaluation script for SQuAD version 2.0",
https://rajpurkar.github.io/SQuAD-explorer/, by the SQuAD authors, Rajpurkar, Jia and Liang), which is
distributed under CC BY-SA 4.0 (https://creativecommons.org/licenses/by-sa/4.0/); this file shares those
functions under the same license. `score_question` is `get_raw_scores`' body for one question with its gold
answer handling and its max over the gold answers unchanged; `summary` is the script's `main` for predictions
without `--na-prob-file` (`apply_no_ans_threshold` then leaves every score as it is). Nothing else is changed.

Usage (standard library only):

    python3 tests/reference/squad_official.py [--abstention TEXT] < cases.jsonl

Each input line is `{"guess": "...", "answers": ["...", ...]}` (an empty list: an unanswerable question). Each
output line is `{"exact": 0 or 1, "f1": F, "f1_bits": B, "guess_normalized": "...", "answers_normalized": [...]}`
(B: the IEEE-754 bits of F as an integer, so the comparison is exact), in input order; a last line holds
`{"summary": ...}`: `make_eval_dict`'s exact, f1 and total overall and for HasAns / NoAns (with `_bits`), as the
script prints them for these questions (ids q0, q1, ...).

`--abstention TEXT` maps a model's own abstention onto the official one: a guess whose official normalization
equals TEXT's is scored as the empty prediction. This mapping is Bessie's convention, not the script's.
"""
import argparse
import collections
import json
import re
import string
import struct
import sys

# ---- from evaluate-v2.0.py (SQuAD 2.0 official evaluation script, CC BY-SA 4.0), verbatim ----


def normalize_answer(s):
  """Lower text and remove punctuation, articles and extra whitespace."""
  def remove_articles(text):
    regex = re.compile(r'\b(a|an|the)\b', re.UNICODE)
    return re.sub(regex, ' ', text)
  def white_space_fix(text):
    return ' '.join(text.split())
  def remove_punc(text):
    exclude = set(string.punctuation)
    return ''.join(ch for ch in text if ch not in exclude)
  def lower(text):
    return text.lower()
  return white_space_fix(remove_articles(remove_punc(lower(s))))

def get_tokens(s):
  if not s: return []
  return normalize_answer(s).split()

def compute_exact(a_gold, a_pred):
  return int(normalize_answer(a_gold) == normalize_answer(a_pred))

def compute_f1(a_gold, a_pred):
  gold_toks = get_tokens(a_gold)
  pred_toks = get_tokens(a_pred)
  common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
  num_same = sum(common.values())
  if len(gold_toks) == 0 or len(pred_toks) == 0:
    # If either is no-answer, then F1 is 1 if they agree, 0 otherwise
    return int(gold_toks == pred_toks)
  if num_same == 0:
    return 0
  precision = 1.0 * num_same / len(pred_toks)
  recall = 1.0 * num_same / len(gold_toks)
  f1 = (2 * precision * recall) / (precision + recall)
  return f1

def make_eval_dict(exact_scores, f1_scores, qid_list=None):
  if not qid_list:
    total = len(exact_scores)
    return collections.OrderedDict([
        ('exact', 100.0 * sum(exact_scores.values()) / total),
        ('f1', 100.0 * sum(f1_scores.values()) / total),
        ('total', total),
    ])
  else:
    total = len(qid_list)
    return collections.OrderedDict([
        ('exact', 100.0 * sum(exact_scores[k] for k in qid_list) / total),
        ('f1', 100.0 * sum(f1_scores[k] for k in qid_list) / total),
        ('total', total),
    ])

def merge_eval(main_eval, new_eval, prefix):
  for k in new_eval:
    main_eval['%s_%s' % (prefix, k)] = new_eval[k]

# ---- end of the transcription ----


def score_question(qa, a_pred):
  """`get_raw_scores`' body for one question `qa` (with `answers` as in the dataset) and its prediction."""
  gold_answers = [a['text'] for a in qa['answers']
                  if normalize_answer(a['text'])]
  if not gold_answers:
    # For unanswerable questions, only correct answer is empty string
    gold_answers = ['']
  # Take max over all gold answers
  return (max(compute_exact(a, a_pred) for a in gold_answers),
          max(compute_f1(a, a_pred) for a in gold_answers))


def summary(exact_scores, f1_scores, qid_to_has_ans):
  """The script's `main` from its raw scores on, without a no-answer probability file."""
  has_ans_qids = [k for k, v in qid_to_has_ans.items() if v]
  no_ans_qids = [k for k, v in qid_to_has_ans.items() if not v]
  out_eval = make_eval_dict(exact_scores, f1_scores)
  if has_ans_qids:
    has_ans_eval = make_eval_dict(exact_scores, f1_scores, qid_list=has_ans_qids)
    merge_eval(out_eval, has_ans_eval, 'HasAns')
  if no_ans_qids:
    no_ans_eval = make_eval_dict(exact_scores, f1_scores, qid_list=no_ans_qids)
    merge_eval(out_eval, no_ans_eval, 'NoAns')
  return out_eval


def bits(x):
  return struct.unpack('<Q', struct.pack('<d', float(x)))[0]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--abstention', help='a guess normalizing as this does is the empty prediction')
  args = parser.parse_args()
  abstention = None if args.abstention is None else normalize_answer(args.abstention)
  exact_scores, f1_scores, qid_to_has_ans = {}, {}, {}
  for i, line in enumerate(sys.stdin):
    if not line.strip():
      continue
    case = json.loads(line)
    guess, answers = case['guess'], case['answers']
    if abstention is not None and normalize_answer(guess) == abstention:
      guess = ''
    qid = 'q%d' % i
    qa = {'id': qid, 'answers': [{'text': a} for a in answers]}
    qid_to_has_ans[qid] = bool(qa['answers'])
    exact_scores[qid], f1_scores[qid] = score_question(qa, guess)
    print(json.dumps({
        'exact': exact_scores[qid],
        'f1': float(f1_scores[qid]),
        'f1_bits': bits(f1_scores[qid]),
        'guess_normalized': normalize_answer(case['guess']),
        'answers_normalized': [normalize_answer(a) for a in answers],
    }))
  out_eval = summary(exact_scores, f1_scores, qid_to_has_ans) if exact_scores else {}
  for k in list(out_eval):
    if k.endswith('exact') or k.endswith('f1'):
      out_eval[k + '_bits'] = bits(out_eval[k])
  print(json.dumps({'summary': out_eval}))


if __name__ == '__main__':
  main()
