"""Prompt sets: finite lists of ``(prompt, metadata)`` pairs that training draws from uniformly.

- :mod:`.sets`: word lists and files (``simple_animals``, ``counting``, ``from_file``, ...) and :class:`PromptSet`;
- :mod:`.benchmarks`: PartiPrompts (shipped), DrawBench and GenEval (your copy);
- :mod:`.synthesis`: ``prompts=llm``, written by a language model (with :mod:`.filters` for its replies);
- :mod:`.run_files`: sets made at run time, kept in the run folder;
- :mod:`.words`: number words, articles, plurals.

The toy world's sets are in :mod:`ddpo_cli.toyworld.prompts`. ``conf/prompts/*.yaml`` name the builders below.
"""
from .benchmarks import drawbench, geneval, parti_prompts
from .sets import PromptSet, animal_activities, counting, from_file, from_list, imagenet_animals, simple_animals

__all__ = ["PromptSet", "animal_activities", "counting", "drawbench", "from_file", "from_list", "geneval",
           "imagenet_animals", "parti_prompts", "simple_animals"]
