"""Corpus preparation: enwik8, PG-19, Wikitext-103 and any text, as fairseq data directories.

Each preparer writes ``data-bin/NAME/`` with ``dict.txt`` and ``{train,valid,test}.{bin,idx}`` in fairseq's mmap
format (written with fairseq's own ``MMapIndexedDatasetBuilder`` and ``Dictionary``, so the files are what
``fairseq-preprocess`` makes), plus ``README.md`` and ``prepare.json`` saying how the data was made (source and
checksums, tokenization, token counts). ``prepare.json`` is written last into a temporary sibling directory that
is then renamed: a directory without it was not finished. Re-running with the same options does nothing; a
damaged previous output is detected and prepared again.

Token symbols in ``dict.txt`` (one ``symbol count`` per line, so whitespace cannot appear literally):

- bytes: the decimal value of the byte, ``0`` to ``255`` (the symbols of fairseq's adaptive-span enwik8 recipe);
- characters: the character itself, or ``<U+XXXX>`` (its code point) for whitespace and unprintable characters;
- sentencepiece pieces: the piece, its whitespace and unprintable characters written as for characters;
- words (Wikitext-103): as ``fairseq-preprocess`` writes them;
- the newline is ``</s>`` with ``--newlines eos`` and is left out with ``--newlines drop``.

``vocab.decode`` maps token ids back to the bytes they came from.

The scripts in ``scripts/prepare_*.py`` are the command lines of these modules.
"""
