"""The runnable examples in the public docstrings run and print what they claim."""

import doctest

import pytest

import mara_hf.agent
import mara_hf.candidates
import mara_hf.generation
import mara_hf.processor


@pytest.mark.parametrize("module", [mara_hf.agent, mara_hf.candidates, mara_hf.processor, mara_hf.generation])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
