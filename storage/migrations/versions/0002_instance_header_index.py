"""instances: header facts for series and slice choice

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

COLUMNS: list[tuple[str, sa.types.TypeEngine[Any]]] = [
    ("modality", sa.String(length=16)),
    ("image_type", sa.Text()),
    ("instance_number", sa.String(length=12)),
    ("image_position_patient", sa.Text()),
    ("image_orientation_patient", sa.Text()),
    ("rows", sa.Integer()),
    ("columns", sa.Integer()),
    ("number_of_frames", sa.String(length=12)),
    ("photometric_interpretation", sa.String(length=16)),
    ("burned_in_annotation", sa.String(length=3)),
    ("body_part_examined", sa.String(length=16)),
    ("view_position", sa.String(length=16)),
]


def upgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        for name, type_ in COLUMNS:
            batch_op.add_column(sa.Column(name, type_, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        for name, _ in reversed(COLUMNS):
            batch_op.drop_column(name)
