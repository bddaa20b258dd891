"""Stage 0 of the method: where the long chains of thought come from.

`records`: the `TeacherRecord` schema the later stages read; `sources`: the teacher sources
(CHAMP, s1K, local files, traces generated now by a model).
"""
