"""Temporary: conf/teacher/*.yaml still name `palign.data.teachers.<Class>` as `_target_`. The teacher
sources live in `palign.teachers.sources`; remove this file once conf/ points there."""

from palign.teachers.sources import ChampTeacher, GeneratedTeacher, JsonlTeacher, S1KTeacher  # noqa: F401
