"""console: indexes for the studies page (newest first, by state, by calling AE) and the log of
actions taken from the web console (who, when, what)

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_studies_first_received_at", "studies", ["first_received_at"])
    op.create_index("ix_studies_state_first_received_at", "studies", ["state", "first_received_at"])
    op.create_index(
        "ix_studies_calling_ae_first_received_at", "studies", ["calling_ae_title", "first_received_at"]
    )
    op.create_index("ix_outbox_state", "outbox", ["state"])
    op.create_index("ix_api_calls_called_at", "api_calls", ["called_at"])
    op.create_table(
        "console_actions",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("who", sa.String(length=128), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_console_actions_study_instance_uid", "console_actions", ["study_instance_uid"])


def downgrade() -> None:
    op.drop_index("ix_console_actions_study_instance_uid", table_name="console_actions")
    op.drop_table("console_actions")
    op.drop_index("ix_api_calls_called_at", table_name="api_calls")
    op.drop_index("ix_outbox_state", table_name="outbox")
    op.drop_index("ix_studies_calling_ae_first_received_at", table_name="studies")
    op.drop_index("ix_studies_state_first_received_at", table_name="studies")
    op.drop_index("ix_studies_first_received_at", table_name="studies")
