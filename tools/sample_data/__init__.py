"""The generator of data/sample/ (run it with `python -m tools.make_sample_data`), split by concern:

world.py    the invented world, Kethmar: word lists, invented names, towns, pet creatures, people
formats.py  the sentence, question and answer templates, the paragraph writers, the message helpers
tasks.py    arithmetic problems, reading-comprehension questions, and the held-out splits of people and problems
files.py    one function per output file, and generate(), which writes them all in the order the shipped data needs
tooluse.py  the tool-use files (world.json, sft_tools.jsonl, rl_tools.jsonl) built around the same world
readme.py   data/sample/README.md
"""
