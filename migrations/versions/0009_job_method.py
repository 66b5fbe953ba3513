"""job method: a job's training method and its hyperparameters (supervised or DPO)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02 22:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Null is a supervised job: every job made before this revision.
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("method", sa.JSON(), nullable=True))


def downgrade() -> None:
    # The code before this revision would train a preference job as a supervised one: such jobs go first.
    op.execute("DELETE FROM jobs WHERE method IS NOT NULL")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("method")
